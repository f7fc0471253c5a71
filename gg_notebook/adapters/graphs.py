"""Graphs captured elsewhere as a `Problem`: `from_graphs`.

A user (or another verifier, such as GraphGuard) may already hold the single-device graph and each
rank's graph, captured on a GPU cluster: ``torch.fx.GraphModule`` objects, or their printed source
(``gm.print_readable()``, one ``class ...(torch.nn.Module)`` with a ``forward(self, primals_1: "f32[..]",
...)`` per file). `from_graphs` turns them into the two programs a `Problem` needs:

* the sequential program runs the single-device graph; the distributed program runs rank r's graph
  on rank r. Printed source is compiled under its own file name, so every operator's source line is
  the graph file's line (and the captured ``# File: ...`` comment above it names the model's line);
* inputs are the graph's placeholders, by name (``primals_1`` ...), with the shapes and dtypes their
  annotations give (example tensors are drawn from them, or passed); rank r's placeholders must have
  the local shapes its placements give, or the error names the rank, the input and both shapes;
* ``device='cuda'`` literals run on the CPU (values do not depend on the device);
* functional collectives (``torch.ops._c10d_functional.*``) name the communicator of the cluster they
  were captured on: each such group name is mapped to a group of this run (``groups``; by default the
  only name used is the whole world). In the single-device graph a collective can only run on a group
  of one rank, which is the identity (and anything else is an error);
* ``self._tensor_constantN`` attributes (constants the capture lifted out of the graph) take the
  values in ``constants``: their values are not in the printed source;
* operators of other libraries (``torch.ops.apex.fused_layer_norm_affine_fwd``) are given a
  definition in ``definitions``: a function with type annotations, registered as a custom operator
  and used as its decomposition (`gg_notebook.ir.decompose`), so both sides are proved on its
  definition;
* ``outputs`` selects the outputs to verify, by the names the graph returns (a forward graph of an
  autograd capture also returns what it saves for the backward).
"""

from __future__ import annotations

import ast
import itertools
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from gg_notebook.problem import InputPlacement, Problem, ProblemError, local_input

_DTYPES = {
    "f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64,
    "i8": torch.int8, "i16": torch.int16, "i32": torch.int32, "i64": torch.int64, "u8": torch.uint8,
    "b8": torch.bool, "c32": torch.complex32, "c64": torch.complex64, "c128": torch.complex128,
}
_ANNOTATION = re.compile(r"^\s*(\w+)\[([^\]]*)\]\s*$")
_FUNCTIONAL = "_c10d_functional"
_counter = itertools.count()


class GraphImportError(ProblemError):
    """A graph that cannot be read or run as given; the message names the graph, the input or the
    operator, and the fix."""


@dataclass
class GraphProgram:
    """One imported graph: a callable module plus what its signature and return say."""

    module: torch.nn.Module
    label: str  # "the sequential graph" / "rank 1's graph" (file name in parentheses)
    input_names: tuple[str, ...]
    input_specs: tuple[tuple[tuple[int, ...], torch.dtype] | None, ...]  # from annotations
    output_names: tuple[str | None, ...]  # the names the forward returns (None: not a plain name)
    collectives: tuple[tuple[str, str], ...]  # (operator, group name) as written


# ----------------------------------------------------------------------------------- reading
def read_graph(src, *, label: str, constants: Mapping[str, Any] | Callable[[str], Any] | None = None
               ) -> GraphProgram:
    """A `GraphProgram` from a ``GraphModule`` / ``nn.Module``, a path to printed source, or the
    printed source itself."""
    if isinstance(src, fx.GraphModule):
        module, text = _portable_graph_module(src, label), None
    elif isinstance(src, torch.nn.Module):
        module, text = src, None
    else:
        text, where = _source_text(src, label)
        module = _compile_module(text, where, label)
    names, specs = _signature(module, label)
    outputs = _returned_names(text) if text is not None else _fx_output_names(module)
    colls = _collectives_in(text) if text is not None else _fx_collectives(module)
    _set_constants(module, text, constants, label)
    return GraphProgram(module, label, names, specs, outputs, colls)


def _source_text(src, label: str) -> tuple[str, str]:
    if isinstance(src, os.PathLike) or (isinstance(src, str) and "\n" not in src and src.endswith(".py")):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise GraphImportError(f"{label}: no file {path!r}; give a GraphModule, the path of its printed "
                                   f"source (gm.print_readable()) or the source text.")
        with open(path, encoding="utf-8") as f:
            return f.read(), os.path.abspath(path)
    if isinstance(src, str):
        return src, f"<{label} #{next(_counter)}>"
    raise GraphImportError(f"{label} is a {type(src).__name__}: give a torch.fx.GraphModule, the path of its printed "
                           f"source (a .py file from gm.print_readable()) or the source text.")


def _compile_module(text: str, where: str, label: str) -> torch.nn.Module:
    try:
        code = compile(text, where, "exec", dont_inherit=True)  # not this module's `from __future__`
    except SyntaxError as e:
        raise GraphImportError(f"{label}: the source does not parse ({where}:{e.lineno}: {e.msg}).") from None
    if where.startswith("<"):
        import linecache

        linecache.cache[where] = (len(text), None, text.splitlines(True), where)  # source lines for findings
    # gm.print_readable() prints no imports: the names a printed graph uses are given
    ns: dict = {"__name__": f"gg_graph_{next(_counter)}", "__file__": where, "torch": torch,
                "device": torch.device, "inf": float("inf"), "nan": float("nan")}
    try:
        exec(code, ns)  # noqa: S102 - the user's own graph file, as `import` would run it
    except Exception as e:  # noqa: BLE001
        raise GraphImportError(f"{label}: running the module source failed: {type(e).__name__}: {e}") from None
    classes = [v for v in ns.values() if isinstance(v, type) and issubclass(v, torch.nn.Module)
               and v.__module__ == ns["__name__"]]
    if len(classes) != 1:
        found = ", ".join(c.__name__ for c in classes) or "none"
        raise GraphImportError(f"{label}: expected one torch.nn.Module class with a forward (printed by "
                               f"gm.print_readable()), found {found}.")
    # the graph ran on another machine: device literals become this machine's CPU; the operator
    # namespaces go through `_TorchView` (collective group names, size-1 collectives)
    ns["device"] = _cpu_device
    ns["torch"] = _TorchView(label)
    try:
        return classes[0]()
    except Exception as e:  # noqa: BLE001
        raise GraphImportError(f"{label}: building {classes[0].__name__}() failed: {type(e).__name__}: {e}") from None


def _portable_graph_module(gm: fx.GraphModule, label: str) -> fx.GraphModule:
    """A copy of ``gm`` that runs here: device arguments on the CPU, functional collectives through
    the group mapping (`_run_collective`)."""
    import copy

    gm = copy.deepcopy(gm)

    def cpu(a):
        if isinstance(a, torch.device):
            return torch.device("cpu")
        if isinstance(a, (list, tuple)):
            return type(a)(cpu(x) for x in a)
        if isinstance(a, dict):
            return {k: cpu(v) for k, v in a.items()}
        return a

    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        n.args, n.kwargs = cpu(n.args), cpu(n.kwargs)
        t = n.target
        if isinstance(t, torch._ops.OpOverload) and t.namespace == _FUNCTIONAL and \
                not t._schema.name.endswith("wait_tensor"):
            n.target = _CollectiveCall(t, label)
    gm.recompile()
    return gm


class _CollectiveCall:
    """A functional collective of an imported GraphModule, run through the group mapping."""

    def __init__(self, op, label: str) -> None:
        self.op, self.label = op, label
        self.__name__ = f"collective_{op._schema.name.split('::')[-1]}"

    def __call__(self, *args, **kwargs):
        return _run_collective(self.op, self.label, list(args), dict(kwargs))


def _cpu_device(*args, **kwargs) -> torch.device:
    return torch.device("cpu")


def _signature(module: torch.nn.Module, label: str):
    import inspect

    fwd = module.forward
    try:
        params = [p for p in inspect.signature(fwd).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        raise GraphImportError(f"{label}: cannot read the forward's parameters.") from None
    names, specs = [], []
    for p in params:
        names.append(p.name)
        specs.append(_parse_annotation(p.annotation))
    if isinstance(module, fx.GraphModule):
        vals = [n.meta.get("val") for n in module.graph.nodes if n.op == "placeholder"]
        names = [n.name for n in module.graph.nodes if n.op == "placeholder"] or names
        specs = [(tuple(int(s) for s in v.shape), v.dtype) if isinstance(v, torch.Tensor) else
                 (specs[i] if i < len(specs) else None) for i, v in enumerate(vals)] or specs
    return tuple(names), tuple(specs)


def _parse_annotation(ann) -> tuple[tuple[int, ...], torch.dtype] | None:
    if not isinstance(ann, str):
        return None
    m = _ANNOTATION.match(ann)
    if m is None or m.group(1) not in _DTYPES:
        return None
    dims = [d.strip() for d in m.group(2).split(",") if d.strip()]
    try:
        shape = tuple(int(d) for d in dims)
    except ValueError:
        return None  # symbolic sizes (s0): the shape comes from the example inputs
    return shape, _DTYPES[m.group(1)]


def _forward_def(text: str) -> ast.FunctionDef | None:
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef) and node.name == "forward":
            return node
    return None


def _returned_names(text: str) -> tuple[str | None, ...]:
    fn = _forward_def(text)
    if fn is None:
        return ()
    rets = [n for n in ast.walk(fn) if isinstance(n, ast.Return) and n.value is not None]
    if not rets:
        return ()
    v = rets[-1].value
    elts = v.elts if isinstance(v, (ast.List, ast.Tuple)) else [v]
    return tuple(e.id if isinstance(e, ast.Name) else None for e in elts)


def _fx_output_names(module) -> tuple[str | None, ...]:
    if not isinstance(module, fx.GraphModule):
        return ()
    out = next((n for n in module.graph.nodes if n.op == "output"), None)
    if out is None:
        return ()
    v = out.args[0]
    elts = v if isinstance(v, (list, tuple)) else [v]
    return tuple(e.name if isinstance(e, fx.Node) else None for e in elts)


def _collectives_in(text: str) -> tuple[tuple[str, str], ...]:
    """(operator, group name) of every functional collective call written in the source."""
    out = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if f".{_FUNCTIONAL}." not in name or name.endswith("wait_tensor.default"):
            continue
        group = _group_arg(name, [a.value if isinstance(a, ast.Constant) else None for a in node.args],
                           {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)})
        if group is not None:
            out.append((name.split(f"{_FUNCTIONAL}.")[-1], str(group)))
    return tuple(out)


def _fx_collectives(module) -> tuple[tuple[str, str], ...]:
    if not isinstance(module, fx.GraphModule):
        return ()
    out = []
    for n in module.graph.nodes:
        t = n.target.op if isinstance(n.target, _CollectiveCall) else n.target
        if n.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t.namespace == _FUNCTIONAL:
            g = _group_arg(str(t), list(n.args), dict(n.kwargs))
            if g is not None:
                out.append((str(t).split(".", 1)[-1], str(g)))
    return tuple(out)


def _group_arg(name: str, args: list, kwargs: dict):
    op = _functional_op(name)
    if op is None:
        return None
    idx = [a.name for a in op._schema.arguments].index("group_name") if "group_name" in \
        [a.name for a in op._schema.arguments] else None
    if idx is None:
        return None
    if "group_name" in kwargs:
        return kwargs["group_name"]
    return args[idx] if idx < len(args) else None


def _functional_op(name: str):
    parts = name.split(f"{_FUNCTIONAL}.")[-1].split(".")
    packet = getattr(torch.ops._c10d_functional, parts[0], None)
    if packet is None:
        return None
    return getattr(packet, parts[1] if len(parts) > 1 else "default", None)


def _set_constants(module, text: str | None, constants, label: str) -> None:
    """Give ``self.<name>`` attributes the forward reads (lifted tensor constants) their values."""
    if text is None:
        return
    fn = _forward_def(text)
    if fn is None:
        return
    wanted: dict[str, None] = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            wanted.setdefault(node.attr, None)
    missing = [n for n in wanted if not hasattr(module, n)]
    if not missing:
        return
    dtypes = _constant_dtypes(fn)
    absent = []
    for name in missing:
        if constants is None:
            absent.append(name)
            continue
        if callable(constants) and not isinstance(constants, Mapping):
            value = constants(name)
        elif name in constants:
            value = constants[name]
        else:
            absent.append(name)
            continue
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(value, dtype=dtypes.get(name))
        setattr(module, name, value)
    if absent:
        shown = ", ".join(f"{n!r}: <value>" for n in absent)
        raise GraphImportError(
            f"{label} reads {', '.join('self.' + n for n in absent)}: constants the capture lifted out of the graph, "
            f"whose values the printed source does not contain. Pass them: constants={{{shown}}} (a number or a "
            f"tensor each; a number takes the dtype the graph annotates).")


def _constant_dtypes(fn: ast.FunctionDef) -> dict[str, torch.dtype]:
    """The dtype the graph annotates on the node that reads each lifted constant
    (``lift_fresh_copy: "i64[]" = ...lift_fresh_copy.default(_tensor_constant0)``)."""
    alias: dict[str, str] = {}  # local name -> attribute (`_tensor_constant0 = self._tensor_constant0`)
    out: dict[str, torch.dtype] = {}
    for st in fn.body:
        if isinstance(st, ast.Assign) and isinstance(st.value, ast.Attribute) and \
                isinstance(st.value.value, ast.Name) and st.value.value.id == "self":
            for t in st.targets:
                if isinstance(t, ast.Name):
                    alias[t.id] = st.value.attr
        elif isinstance(st, ast.AnnAssign) and isinstance(st.value, ast.Call) and isinstance(st.annotation, ast.Constant):
            spec = _parse_annotation(st.annotation.value)
            if spec is None:
                continue
            for a in st.value.args:
                if isinstance(a, ast.Name) and a.id in alias:
                    out.setdefault(alias[a.id], spec[1])
    return out


# ----------------------------------------------------------------------------------- operator view
class _TorchView:
    """``torch`` as a graph's source sees it: everything is torch itself, except that
    ``torch.ops._c10d_functional`` maps the captured group names (see `_Collectives`)."""

    def __init__(self, label: str) -> None:
        self._ops = _OpsView(label)

    def __getattr__(self, name):
        if name == "ops":
            return self._ops
        return getattr(torch, name)


class _OpsView:
    def __init__(self, label: str) -> None:
        self._label = label

    def __getattr__(self, namespace):
        if namespace == _FUNCTIONAL:
            return _FunctionalView(self._label)
        try:
            return getattr(torch.ops, namespace)
        except (AttributeError, RuntimeError):
            raise GraphImportError(f"{self._label} calls operators of library {namespace!r}, which is not loaded: "
                                   f"give each one a definition (definitions={{'{namespace}::<op>': fn}}).") from None


class _FunctionalView:
    def __init__(self, label: str) -> None:
        self._label = label

    def __getattr__(self, name):
        return _PacketView(self._label, name)


class _PacketView:
    def __init__(self, label: str, name: str) -> None:
        self._label, self._name = label, name

    def __getattr__(self, overload):
        op = _functional_op(f"{_FUNCTIONAL}.{self._name}.{overload}")
        if op is None:
            raise GraphImportError(f"{self._label} calls torch.ops.{_FUNCTIONAL}.{self._name}.{overload}, which this "
                                   f"PyTorch does not have.")
        return lambda *args, **kwargs: _run_collective(op, self._label, list(args), dict(kwargs))

    def __call__(self, *args, **kwargs):
        return self.default(*args, **kwargs)


# the group mapping of the program now running: {captured group name: (group name here, size)},
# or None while the single-device graph runs (every collective there is on a group of one rank)
_ACTIVE: dict = {"groups": None}


def _run_collective(op, label: str, args: list, kwargs: dict):
    names = [a.name for a in op._schema.arguments]
    if op._schema.name.endswith("wait_tensor"):
        return op(*args, **kwargs)
    groups = _ACTIVE["groups"]
    gi = names.index("group_name")
    captured = kwargs.get("group_name", args[gi] if gi < len(args) else None)
    size_arg = "group_size" if "group_size" in names else None
    if groups is None:  # the single-device program: a group of one rank
        if size_arg is not None:
            si = names.index(size_arg)
            size = kwargs.get(size_arg, args[si] if si < len(args) else None)
            if size not in (1, None):
                raise GraphImportError(
                    f"{label} calls {op} over a group of {size} ranks (group {captured!r}): a single-device graph "
                    f"can only hold collectives on a group of one rank (the identity).")
        return args[0].clone()
    if str(captured) not in groups:
        raise GraphImportError(f"{label} calls {op} on group {captured!r}, which `groups` does not map.")
    here, size = groups[str(captured)]
    if size_arg is not None:
        si = names.index(size_arg)
        want = kwargs.get(size_arg, args[si] if si < len(args) else None)
        if want is not None and int(want) != size:
            raise GraphImportError(f"{label} calls {op} with group_size={want} on group {captured!r}, which has "
                                   f"{size} ranks here.")
    if "group_name" in kwargs:
        kwargs["group_name"] = here
    else:
        args[gi] = here
    return op(*args, **kwargs)


# ----------------------------------------------------------------------------------- definitions
def register_definitions(definitions: Mapping[str, Callable] | None) -> dict:
    """Register each ``"lib::op"`` (or ``"lib.op"``) of ``definitions`` as a custom operator whose
    kernel is the definition (unless the library already defines it); returns the decompositions
    ``{OpOverload: fn}`` for `Problem.decompositions`."""
    out: dict = {}
    for key, fn in (definitions or {}).items():
        if isinstance(key, torch._ops.OpOverload):
            out[key] = fn
            continue
        qual = str(key).replace(".", "::", 1) if "::" not in str(key) else str(key)
        ns, _, name = qual.partition("::")
        name = name.split(".")[0]
        if not ns or not name:
            raise GraphImportError(f"definitions key {key!r}: write 'library::operator', e.g. "
                                   f"'apex::fused_layer_norm_affine_fwd'.")
        packet = getattr(getattr(torch.ops, ns), name, None) if _has_op(ns, name) else None
        if packet is None:
            if not callable(fn):
                raise GraphImportError(f"definitions[{key!r}] is {fn!r}: give a function of the operator's arguments.")
            try:
                torch.library.custom_op(f"{ns}::{name}", mutates_args=())(fn)
            except Exception as e:  # noqa: BLE001 - schema inference needs annotations
                raise GraphImportError(
                    f"definitions[{key!r}]: cannot register it as an operator ({type(e).__name__}: {e}). Annotate the "
                    f"function's parameters and return (Tensor, int, float, list[int], tuple[Tensor, ...]) so its "
                    f"schema can be inferred.") from None
            packet = getattr(getattr(torch.ops, ns), name)
            fn_ = fn

            @torch.library.register_fake(f"{ns}::{name}")
            def _fake(*args, _fn=fn_, **kwargs):
                return _fn(*args, **kwargs)
        out[packet.default] = fn
    return out


def _has_op(ns: str, name: str) -> bool:
    try:
        return hasattr(getattr(torch.ops, ns), name)
    except (AttributeError, RuntimeError):
        return False


# ----------------------------------------------------------------------------------- problem
def from_graphs(sequential, ranks: Sequence, placements, *, outputs: Sequence[str] | None = None,
                expect=None, inputs: Sequence[torch.Tensor] | None = None, constants=None,
                definitions: Mapping[str, Callable] | None = None, groups: Mapping[str, Any] | None = None,
                domains: dict | None = None, random: str = "refuse", name: str | None = None,
                decompositions: dict | None = None) -> Problem:
    """A `Problem` whose programs are graphs captured elsewhere (see the module docstring).

    ``placements``: one per placeholder of the single-device graph, as a list or ``{name: placement}``
    covering every placeholder. ``outputs``: names the single-device graph returns (default: all),
    matched by position in each rank's return. ``groups``: ``{captured group name: "world" or a list of
    ranks}`` (default: the one name the rank graphs use is the whole world). ``inputs``: example tensors
    (default: drawn from the annotations; meta tensors above 2**24 elements, so only the proof runs).
    """
    W = len(ranks)
    if W < 1:
        raise GraphImportError("ranks is empty: give one graph per rank.")
    seq = read_graph(sequential, label=_label("the sequential graph", sequential), constants=constants)
    rank_progs = [read_graph(g, label=_label(f"rank {r}'s graph", g), constants=constants) for r, g in enumerate(ranks)]
    decomps = dict(decompositions or {})
    decomps.update(register_definitions(definitions))

    names = seq.input_names
    pls = _placements_list(placements, names)
    specs = seq.input_specs
    if inputs is None:
        inputs = _example_inputs(seq, domains or {})
    inputs = tuple(inputs)
    if len(inputs) != len(names):
        raise GraphImportError(f"{len(inputs)} example inputs for {len(names)} placeholders of the sequential graph "
                               f"({', '.join(names)}).")
    for i, (t, s) in enumerate(zip(inputs, specs)):
        if s is not None and (tuple(t.shape) != s[0] or t.dtype != s[1]):
            raise GraphImportError(f"example input {names[i]} is {_show(tuple(t.shape), t.dtype)} but the sequential graph "
                                   f"declares {_show(*s)}.")
    for r, g in enumerate(rank_progs):
        _check_rank_inputs(g, r, names, inputs, pls, W)
    picks = _output_picks(seq, rank_progs, outputs)
    mapping = _group_mapping(rank_progs, groups, W)

    def run_sequential(*xs):
        _ACTIVE["groups"] = None
        return _pick(seq.module(*xs), picks)

    def run_rank(*xs):
        import torch.distributed as dist

        r = dist.get_rank()
        _ACTIVE["groups"] = _groups_here(mapping, W)
        try:
            return _pick(rank_progs[r].module(*xs), picks)
        finally:
            _ACTIVE["groups"] = None

    run_sequential.__name__ = "sequential_graph"
    run_rank.__name__ = name or "rank_graphs"
    return Problem(sequential=run_sequential, distributed=run_rank, inputs=inputs, placements=pls,
                   world_size=W, expect=expect, name=name or "graphs", input_names=names, domains=domains,
                   random=random, decompositions=decomps)


def _label(what: str, src) -> str:
    if isinstance(src, (str, os.PathLike)) and (isinstance(src, os.PathLike) or ("\n" not in src and src.endswith(".py"))):
        return f"{what} ({os.path.basename(os.fspath(src))})"
    return what


def _show(shape, dtype) -> str:
    return f"{str(dtype).replace('torch.', '')}{list(shape)}"


def _placements_list(placements, names: Sequence[str]) -> tuple[InputPlacement, ...]:
    if isinstance(placements, Mapping):
        unknown = [k for k in placements if k not in names]
        if unknown:
            raise GraphImportError(f"placements names {', '.join(map(repr, unknown))}, which the sequential graph does "
                                   f"not take (its inputs: {', '.join(names)}).")
        missing = [n for n in names if n not in placements]
        if missing:
            raise GraphImportError(f"placements gives no placement for {', '.join(missing)}: give one per input of the "
                                   f"sequential graph (Replicate(), Shard(d), Partial() or a Layout).")
        return tuple(placements[n] for n in names)
    pls = tuple(placements)
    if len(pls) != len(names):
        raise GraphImportError(f"{len(pls)} placements for {len(names)} inputs of the sequential graph "
                               f"({', '.join(names)}); give one each, or a dict by name.")
    return pls


def _example_inputs(seq: GraphProgram, domains: dict) -> tuple[torch.Tensor, ...]:
    missing = [n for n, s in zip(seq.input_names, seq.input_specs) if s is None]
    if missing:
        raise GraphImportError(f"the sequential graph does not annotate the shapes of {', '.join(missing)}: pass "
                               f"example tensors (inputs=[...]).")
    total = sum(_numel(s[0]) for s in seq.input_specs)
    device = "meta" if total > 2 ** 24 else "cpu"
    g = torch.Generator().manual_seed(0)
    out = []
    for name, (shape, dtype) in zip(seq.input_names, seq.input_specs):
        if device == "meta":
            out.append(torch.empty(shape, dtype=dtype, device="meta"))
        elif dtype.is_floating_point or dtype.is_complex:
            out.append(torch.randn(shape, generator=g).to(dtype))
        elif dtype == torch.bool:
            out.append(torch.rand(shape, generator=g) < 0.5)
        else:
            lo, hi = 0, 2
            d = domains.get(name)
            if isinstance(d, range) and len(d):
                lo, hi = d.start, d.stop
            out.append(torch.randint(lo, hi, shape, generator=g).to(dtype))
    return tuple(out)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_rank_inputs(g: GraphProgram, r: int, names, inputs, pls, W: int) -> None:
    if len(g.input_names) != len(names):
        raise GraphImportError(f"{g.label} takes {len(g.input_names)} inputs but the sequential graph takes {len(names)}: "
                               f"inputs are matched by position.")
    for i, (spec, t, p) in enumerate(zip(g.input_specs, inputs, pls)):
        if spec is None:
            continue
        local = local_input(torch.empty(t.shape, dtype=t.dtype, device="meta"), p, r, W)
        if tuple(local.shape) != spec[0] or local.dtype != spec[1]:
            raise GraphImportError(
                f"{g.label}: input {g.input_names[i]} is {_show(*spec)}, but {p} of the sequential {names[i]} "
                f"({_show(tuple(t.shape), t.dtype)}) gives rank {r} {_show(tuple(local.shape), local.dtype)}: check "
                f"this input's placement.")


def _output_picks(seq: GraphProgram, ranks: list[GraphProgram], outputs) -> list[int] | None:
    if outputs is None:
        return None
    if isinstance(outputs, str):
        outputs = [outputs]
    picks = []
    for o in outputs:
        if o not in seq.output_names:
            shown = ", ".join(n for n in seq.output_names if n) or "none by name"
            raise GraphImportError(f"outputs names {o!r}, which the sequential graph does not return (it returns {shown}).")
        picks.append(seq.output_names.index(o))
    for g in ranks:
        if g.output_names and len(g.output_names) <= max(picks):
            raise GraphImportError(f"{g.label} returns {len(g.output_names)} values; outputs are matched by position "
                                   f"and the sequential graph's {outputs[picks.index(max(picks))]!r} is at {max(picks)}.")
    return picks


def _pick(out, picks):
    if picks is None:
        return out
    seq = list(out) if isinstance(out, (list, tuple)) else [out]
    chosen = [seq[i] for i in picks]
    return chosen[0] if len(chosen) == 1 else tuple(chosen)


def _group_mapping(ranks: list[GraphProgram], groups, W: int) -> dict[str, tuple[int, ...]]:
    used = sorted({name for g in ranks for _, name in g.collectives})
    if groups is None:
        if len(used) > 1:
            raise GraphImportError(f"the rank graphs use {len(used)} communicators ({', '.join(map(repr, used))}): say "
                                   f"which ranks each one spans, groups={{{', '.join(repr(u) + ': [...]' for u in used)}}}.")
        return {u: tuple(range(W)) for u in used}
    out = {}
    for k, v in groups.items():
        ranks_ = tuple(range(W)) if v == "world" else tuple(int(x) for x in v)
        if not ranks_ or any(x < 0 or x >= W for x in ranks_) or len(set(ranks_)) != len(ranks_):
            raise GraphImportError(f"groups[{k!r}] = {v!r}: give 'world' or distinct ranks in [0, {W}).")
        out[str(k)] = ranks_
    unmapped = [u for u in used if u not in out]
    if unmapped:
        raise GraphImportError(f"the rank graphs use communicator(s) {', '.join(map(repr, unmapped))}, which groups "
                               f"does not map.")
    return out


def _groups_here(mapping: dict[str, tuple[int, ...]], W: int) -> dict[str, tuple[str, int]]:
    """Each captured group name -> (this run's group name, size). Every rank creates the same
    subgroups in the same order, as `torch.distributed.new_group` requires."""
    import torch.distributed as dist

    world = dist.group.WORLD
    out: dict[str, tuple[str, int]] = {}
    made: dict[tuple[int, ...], Any] = {}
    for k in sorted(mapping):
        ranks_ = mapping[k]
        if ranks_ == tuple(range(W)):
            pg = world
        else:
            key = tuple(sorted(ranks_))
            if key not in made:
                made[key] = dist.new_group(list(key))
            pg = made[key]
        out[k] = (pg.group_name, len(ranks_))
    return out
