"""AST mutation operators over the distributed functions of a subject module.

A subject module's source is parsed once; every operator walks the *mutable* definitions (the
distributed functions and classes the subject names, never the sequential specification) and yields
`Edit`s: one site, one choice. `apply(tree, edit)` returns a new module tree with that one edit.

Each edit carries an intent: ``"wrong"`` (a realistic bug; ground truth decides whether it really
changes the result) or ``"variant"`` (a semantics-preserving rewrite; ground truth checks that too).
"""

from __future__ import annotations

import ast
import copy
import re
from dataclasses import dataclass
from typing import Callable, Iterator

Path = tuple  # ((field, index-or-None), ...) from the module root to a node


@dataclass(frozen=True)
class Edit:
    operator: str  # e.g. "drop_collective"
    intent: str  # "wrong" | "variant"
    choice: str  # which alternative at the site, e.g. "MAX"
    path: Path  # the site
    line: int  # line of the site in the (specialized) source
    apply: Callable  # (tree, node_at_path, path) -> None, mutates tree in place


# ------------------------------------------------------------------------------------------ paths


def _children(node):
    for field, value in ast.iter_fields(node):
        if isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, ast.AST):
                    yield (field, i), v
        elif isinstance(value, ast.AST):
            yield (field, None), value


def get_at(tree, path: Path):
    node = tree
    for field, i in path:
        node = getattr(node, field) if i is None else getattr(node, field)[i]
    return node


def set_at(tree, path: Path, new) -> None:
    parent = get_at(tree, path[:-1])
    field, i = path[-1]
    if i is None:
        setattr(parent, field, new)
    else:
        getattr(parent, field)[i] = new


def _walk(node, path: Path = ()) -> Iterator[tuple[Path, ast.AST]]:
    yield path, node
    for step, child in _children(node):
        yield from _walk(child, path + (step,))


def mutable_nodes(tree: ast.Module, mutable: tuple[str, ...]) -> Iterator[tuple[Path, ast.AST]]:
    """Every node inside a top-level def/class whose name is in ``mutable`` (docstrings excluded)."""
    for i, top in enumerate(tree.body):
        if isinstance(top, (ast.FunctionDef, ast.ClassDef)) and top.name in mutable:
            for path, node in _walk(top, (("body", i),)):
                if _is_docstring(node):
                    continue
                yield path, node


def _is_docstring(node) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def enclosing_function_path(path: Path, tree) -> Path | None:
    for k in range(len(path), 0, -1):
        if isinstance(get_at(tree, path[:k]), ast.FunctionDef):
            return path[:k]
    return None


# ------------------------------------------------------------------------------------- recognizers

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "reduce_scatter", "all_to_all_single"}
REDUCING = {"all_reduce", "reduce_scatter_tensor"}
_WRAPPER = re.compile(r"(model_parallel_region|^reduce_from|^copy_to|^gather_from|^scatter_to)")
_OFFSET_NAME = re.compile(r"(^rank$|start|offset|^index_f$|^first$)")


def dist_collective(node) -> str | None:
    """``"all_reduce"`` for ``dist.all_reduce(...)`` and the like, else None."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "dist"):
        return node.func.attr
    return None


def wrapper_call(node) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and bool(_WRAPPER.search(node.func.id))
            and len(node.args) == 1)


def collective_stmt(node) -> str | None:
    return dist_collective(node.value) if isinstance(node, ast.Expr) else None


def reduced_input(call: ast.Call, kind: str):
    """(index in args, expression) of the tensor a collective consumes."""
    if kind in ("all_reduce", "broadcast"):
        return (0, call.args[0]) if call.args else None
    return (1, call.args[1]) if len(call.args) > 1 else None


def _expr(src: str) -> ast.expr:
    return ast.parse(src, mode="eval").body


def _stmts(src: str) -> list[ast.stmt]:
    return ast.parse(src).body


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k
    return None


def _set_kw(call: ast.Call, name: str, value: ast.expr) -> None:
    k = _kw(call, name)
    if k is None:
        call.keywords.append(ast.keyword(arg=name, value=value))
    else:
        k.value = value


def _insert_stmts(tree, stmt_path: Path, before: list, after: list = ()) -> None:
    parent = get_at(tree, stmt_path[:-1])
    field, i = stmt_path[-1]
    body = getattr(parent, field)
    body[i:i + 1] = list(before) + [body[i]] + list(after)


def _replace_stmt(tree, stmt_path: Path, new: list) -> None:
    parent = get_at(tree, stmt_path[:-1])
    field, i = stmt_path[-1]
    getattr(parent, field)[i:i + 1] = list(new) or [ast.Pass()]


def _add_prelude(tree: ast.Module, src: str) -> None:
    """Module-level helper code, inserted after the imports."""
    k = 0
    while k < len(tree.body) and (isinstance(tree.body[k], (ast.Import, ast.ImportFrom)) or _is_docstring(tree.body[k])):
        k += 1
    tree.body[k:k] = _stmts(src)


def _function_prelude(tree, path: Path, src: str) -> None:
    fpath = enclosing_function_path(path, tree)
    fn = get_at(tree, fpath)
    k = 1 if fn.body and _is_docstring(fn.body[0]) else 0
    fn.body[k:k] = _stmts(src)


def _line(node) -> int:
    return getattr(node, "lineno", 0)


# ------------------------------------------------------------------------------------ operators
# Each operator: (tree, mutable) -> Iterator[Edit]


def op_drop_collective(tree, mutable):
    for path, node in mutable_nodes(tree, mutable):
        if collective_stmt(node):
            yield Edit("drop_collective", "wrong", node.value.func.attr, path, _line(node),
                       lambda t, n, p: _replace_stmt(t, p, [ast.Pass()]))
        elif wrapper_call(node):
            yield Edit("drop_collective", "wrong", node.func.id, path, _line(node),
                       lambda t, n, p: set_at(t, p, n.args[0]))


def op_duplicate_collective(tree, mutable):
    for path, node in mutable_nodes(tree, mutable):
        if collective_stmt(node):
            yield Edit("duplicate_collective", "wrong", node.value.func.attr, path, _line(node),
                       lambda t, n, p: _insert_stmts(t, p, [], [copy.deepcopy(n)]))
        elif wrapper_call(node):
            yield Edit("duplicate_collective", "wrong", node.func.id, path, _line(node),
                       lambda t, n, p: set_at(t, p, ast.Call(func=n.func, args=[copy.deepcopy(n)], keywords=[])))


def _swap(t, p, delta):
    parent = get_at(t, p[:-1])
    field, i = p[-1]
    body = getattr(parent, field)
    body[i], body[i + delta] = body[i + delta], body[i]


def _move_two_later(t, n, p):
    parent = get_at(t, p[:-1])
    field, i = p[-1]
    body = getattr(parent, field)
    body.insert(i + 2, body.pop(i))


def op_move_collective(tree, mutable):
    for path, node in mutable_nodes(tree, mutable):
        if not collective_stmt(node):
            continue
        parent = get_at(tree, path[:-1])
        field, i = path[-1]
        body = getattr(parent, field)
        if i + 1 < len(body) and not isinstance(body[i + 1], ast.Return):
            yield Edit("move_collective", "wrong", "later", path, _line(node), lambda t, n, p: _swap(t, p, +1))
            if i + 2 < len(body) and not isinstance(body[i + 2], ast.Return):
                yield Edit("move_collective", "wrong", "two later", path, _line(node), _move_two_later)
        if i > 0 and not _is_docstring(body[i - 1]):
            yield Edit("move_collective", "wrong", "earlier", path, _line(node), lambda t, n, p: _swap(t, p, -1))


_OPS = ("SUM", "AVG", "MAX", "MIN", "PRODUCT")


def op_reduce_op(tree, mutable):
    for path, node in mutable_nodes(tree, mutable):
        kind = dist_collective(node)
        if kind not in REDUCING:
            continue
        k = _kw(node, "op")
        current = k.value.attr if k is not None and isinstance(k.value, ast.Attribute) else ("SUM" if k is None else "?")
        for op in _OPS:
            if op == current:
                continue
            intent = "wrong"
            if op == "SUM" and current == "?":
                continue
            if kind == "reduce_scatter_tensor" and op in ("MIN", "PRODUCT"):
                continue
            yield Edit("reduce_op", intent, f"{current}->{op}", path, _line(node),
                       lambda t, n, p, op=op: _set_kw(n, "op", _expr(f"dist.ReduceOp.{op}")))
        if k is None:
            yield Edit("explicit_sum", "variant", "op=SUM", path, _line(node),
                       lambda t, n, p: _set_kw(n, "op", _expr("dist.ReduceOp.SUM")))


def _scalar_choices(v):
    if isinstance(v, bool):
        return [("bool->int", int(v)), ("negate", not v)]
    if isinstance(v, int):
        out = [("int->float", float(v)), ("+1", v + 1)]
        if v == 1:
            out.append(("1->True", True))
        if v not in (0, 1):
            out.append(("-1", v - 1))
        return out
    if isinstance(v, float):
        out = []
        if v.is_integer():
            out.append(("float->int", int(v)))
            if v == 1.0:
                out.append(("1.0->True", True))
        out.append(("halve", v / 2) if v != 0 else ("0.0->1.0", 1.0))
        if v == 0.5:
            out.append(("0.5->0.25", 0.25))
        return out
    return []


def op_scalar(tree, mutable):
    for path, node in mutable_nodes(tree, mutable):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
            for label, new in _scalar_choices(node.value):
                yield Edit("scalar", "wrong", f"{node.value!r}:{label}", path, _line(node),
                           lambda t, n, p, new=new: set_at(t, p, ast.Constant(new)))


# casts/rounding inserted right before a value enters a reduction
_CASTS = {
    "bf16_roundtrip": "{x}.to(torch.bfloat16).to({x}.dtype)",
    "to_bf16": "{x}.to(torch.bfloat16)",
    "half_roundtrip": "{x}.half().to({x}.dtype)",
    "to_int32": "{x}.to(torch.int32)",
    "floor_div": "torch.div({x}, 1, rounding_mode=\"floor\")",
    "round": "{x}.round()",
    "to_float32": "{x}.float()",
}
_SCALARS = {
    "+1.0": ("wrong", "{x} + 1.0"),
    "+1": ("wrong", "{x} + 1"),
    "+True": ("wrong", "{x} + True"),
    "*2": ("wrong", "{x} * 2"),
    "+0.0": ("variant", "{x} + 0.0"),
    "*1.0": ("variant", "{x} * 1.0"),
}


def _reduction_sites(tree, mutable):
    """(path, node, how) for values entering a reduction: ("stmt", name) for ``dist.all_reduce(NAME)``
    statements, ("arg", index) for the consumed argument of other collectives and wrappers."""
    for path, node in mutable_nodes(tree, mutable):
        kind = collective_stmt(node)
        if kind in ("all_reduce",) and node.value.args and isinstance(node.value.args[0], ast.Name):
            yield path, node, ("stmt", node.value.args[0].id)
        elif kind in ("reduce_scatter_tensor",):
            yield path + (("value", None),), node.value, ("arg", 1)
        elif isinstance(node, ast.Call) and wrapper_call(node) and "reduce" in node.func.id:
            yield path, node, ("arg", 0)


def _pre_reduce_edit(operator, intent, choice, path, node, how, template):
    if how[0] == "stmt":
        name = how[1]

        def apply(t, n, p):
            _insert_stmts(t, p, _stmts(f"{name} = " + template.format(x=name)))
    else:
        idx = how[1]

        def apply(t, n, p):
            x = ast.unparse(n.args[idx])
            n.args[idx] = _expr(template.format(x=f"({x})"))
    return Edit(operator, intent, choice, path, _line(node), apply)


def op_cast_before_reduce(tree, mutable):
    for path, node, how in _reduction_sites(tree, mutable):
        for choice, template in _CASTS.items():
            yield _pre_reduce_edit("cast_before_reduce", "wrong", choice, path, node, how, template)


def op_scalar_before_reduce(tree, mutable):
    for path, node, how in _reduction_sites(tree, mutable):
        for choice, (intent, template) in _SCALARS.items():
            yield _pre_reduce_edit("scalar_before_reduce", intent, choice, path, node, how, template)


_REDUCTIONS = ("none", "mean", "sum")


def _attribute_choices(call: ast.Call):
    name = ast.unparse(call.func)
    out = []
    for k in call.keywords:
        v = k.value
        lit = v.value if isinstance(v, ast.Constant) else (
            -v.operand.value if isinstance(v, ast.UnaryOp) and isinstance(v.op, ast.USub)
            and isinstance(v.operand, ast.Constant) and isinstance(v.operand.value, (int, float)) else ...)
        if k.arg == "reduction" and lit in _REDUCTIONS:
            out += [(f"reduction={lit!r}->{r!r}", k.arg, repr(r)) for r in _REDUCTIONS if r != lit]
        elif k.arg == "ignore_index" and isinstance(lit, int):
            out += [(f"ignore_index={lit}->{r}", k.arg, repr(r)) for r in (0, -1, lit + 1) if r != lit]
        elif k.arg == "padding_idx":
            out += [(f"padding_idx={lit!r}->{r!r}", k.arg, repr(r)) for r in (None, 0, 1) if r != lit]
        elif k.arg in ("scale_grad_by_freq", "keepdim", "sparse") and isinstance(lit, bool):
            out.append((f"{k.arg}={lit}->{not lit}", k.arg, repr(not lit)))
        elif k.arg == "label_smoothing" and isinstance(lit, (int, float)):
            out += [(f"label_smoothing={lit}->{r}", k.arg, repr(r)) for r in (0.0, 0.2) if r != lit]
        elif k.arg == "dim" and isinstance(lit, int) and not isinstance(lit, bool):
            out += [(f"dim={lit}->{r}", k.arg, repr(r)) for r in (lit - 1, lit + 1)]
    present = {k.arg for k in call.keywords}
    if name.endswith("cross_entropy"):
        for arg, val in (("ignore_index", "0"), ("label_smoothing", "0.1"), ("reduction", "'sum'")):
            if arg not in present:
                out.append((f"add {arg}={val}", arg, val))
    if name.endswith("embedding") and "F." in name:
        for arg, val in (("padding_idx", "0"), ("scale_grad_by_freq", "True"), ("max_norm", "1.0")):
            if arg not in present:
                out.append((f"add {arg}={val}", arg, val))
    return out


def op_attribute(tree, mutable):
    for path, node in mutable_nodes(tree, mutable):
        if isinstance(node, ast.Call):
            for choice, arg, val in _attribute_choices(node):
                yield Edit("attribute", "wrong", choice, path, _line(node),
                           lambda t, n, p, arg=arg, val=val: _set_kw(n, arg, _expr(val)))


_NEXT_RANK = '''
_gg_calls = 0


def _gg_next_rank():
    """Rank handed out in call order (every rank calls this once per step)."""
    global _gg_calls
    r = _gg_calls % dist.get_world_size()
    _gg_calls += 1
    return r
'''

_CACHED_RANK = '''
_gg_rank = None


def _gg_cached_rank():
    """This process's rank, looked up once."""
    global _gg_rank
    if _gg_rank is None:
        _gg_rank = dist.get_rank()
    return _gg_rank
'''


def _is_get_rank(node) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get_rank"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "dist")


def op_module_state(tree, mutable):
    for path, node in mutable_nodes(tree, mutable):
        if _is_get_rank(node):
            def counter(t, n, p):
                set_at(t, p, _expr("_gg_next_rank()"))
                _add_prelude(t, _NEXT_RANK)

            def cached(t, n, p):
                set_at(t, p, _expr("_gg_cached_rank()"))
                _add_prelude(t, _CACHED_RANK)
            yield Edit("module_state", "wrong", "call-order counter", path, _line(node), counter)
            yield Edit("cached_rank", "variant", "module-level cache", path, _line(node), cached)


def op_reorder_gather(tree, mutable):
    for path, node in mutable_nodes(tree, mutable):
        kind = collective_stmt(node)
        if kind == "all_gather" and isinstance(node.value.args[0], ast.Name):
            name = node.value.args[0].id
            yield Edit("reorder_gather", "wrong", "reverse list", path, _line(node),
                       lambda t, n, p, name=name: _insert_stmts(t, p, [], _stmts(f"{name}.reverse()")))
        elif kind == "all_gather_into_tensor" and isinstance(node.value.args[0], ast.Name):
            name = node.value.args[0].id
            src = f"{name} = torch.cat(list({name}.chunk(dist.get_world_size(), dim=0))[::-1], dim=0)"
            yield Edit("reorder_gather", "wrong", "reverse chunks", path, _line(node),
                       lambda t, n, p, src=src: _insert_stmts(t, p, [], _stmts(src)))
        elif (isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.cat" and node.args
              and isinstance(node.args[0], (ast.Name, ast.List))):
            yield Edit("reorder_gather", "wrong", "cat reversed", path, _line(node),
                       lambda t, n, p: n.args.__setitem__(0, _expr(f"list({ast.unparse(n.args[0])})[::-1]")))


def op_shift_offset(tree, mutable):
    for path, node in mutable_nodes(tree, mutable):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and _OFFSET_NAME.search(node.id):
            parent = get_at(tree, path[:-1])
            if not isinstance(parent, (ast.BinOp, ast.Compare)):
                continue
            for d in ("+ 1", "- 1"):
                yield Edit("shift_offset", "wrong", f"{node.id} {d}", path, _line(node),
                           lambda t, n, p, d=d: set_at(t, p, _expr(f"({n.id} {d})")))


def op_process_group(tree, mutable):
    for path, node in mutable_nodes(tree, mutable):
        if dist_collective(node):
            def same(t, n, p):
                _function_prelude(t, p, "_gg_group = dist.new_group(list(range(dist.get_world_size())))")
                _set_kw(n, "group", _expr("_gg_group"))
            yield Edit("process_group", "variant", "second group, same ranks", path, _line(node), same)

            def halves(t, n, p):
                _function_prelude(t, p, "_gg_group, _ = dist.new_subgroups(max(dist.get_world_size() // 2, 1))")
                _set_kw(n, "group", _expr("_gg_group"))
            yield Edit("process_group", "wrong", "half-size subgroups", path, _line(node), halves)


# ------------------------------------------------------------------------ semantics-preserving rewrites


def op_matmul_spelling(tree, mutable):
    for path, node in mutable_nodes(tree, mutable):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            yield Edit("matmul_spelling", "variant", "@->torch.matmul", path, _line(node),
                       lambda t, n, p: set_at(t, p, ast.Call(func=_expr("torch.matmul"), args=[n.left, n.right], keywords=[])))
            yield Edit("matmul_spelling", "variant", "@->F.linear(w.t())", path, _line(node),
                       lambda t, n, p: set_at(t, p, _expr(
                           f"torch.nn.functional.linear({ast.unparse(n.left)}, ({ast.unparse(n.right)}).t())")))
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.matmul" and len(node.args) == 2:
            yield Edit("matmul_spelling", "variant", "torch.matmul->@", path, _line(node),
                       lambda t, n, p: set_at(t, p, ast.BinOp(left=n.args[0], op=ast.MatMult(), right=n.args[1])))


def op_arith_spelling(tree, mutable):
    for path, node in mutable_nodes(tree, mutable):
        if not isinstance(node, ast.BinOp) or not isinstance(node.right, ast.Constant):
            continue
        c = node.right.value
        if isinstance(node.op, ast.Mult) and c == 2:
            yield Edit("arith_spelling", "variant", "x*2->x+x", path, _line(node),
                       lambda t, n, p: set_at(t, p, ast.BinOp(left=n.left, op=ast.Add(), right=copy.deepcopy(n.left))))
        if isinstance(node.op, ast.Mult) and c == 0.5:
            yield Edit("arith_spelling", "variant", "x*0.5->x/2", path, _line(node),
                       lambda t, n, p: set_at(t, p, ast.BinOp(left=n.left, op=ast.Div(), right=ast.Constant(2))))
        if isinstance(node.op, ast.Add) and type(c) in (int, float) and c != 0:
            yield Edit("arith_spelling", "variant", "x+c->torch.add(x,c)", path, _line(node),
                       lambda t, n, p: set_at(t, p, ast.Call(func=_expr("torch.add"), args=[n.left, n.right], keywords=[])))


def op_collective_spelling(tree, mutable):
    for path, node in mutable_nodes(tree, mutable):
        kind = collective_stmt(node)
        call = node.value if kind else None
        if kind == "all_gather_into_tensor" and isinstance(call.args[0], ast.Name):
            out, inp = call.args[0].id, ast.unparse(call.args[1])
            src = (f"_gg_in = {inp}\n_gg_parts = [torch.empty_like(_gg_in) for _ in range(dist.get_world_size())]\n"
                   f"dist.all_gather(_gg_parts, _gg_in)\n{out} = torch.cat(_gg_parts, dim=0)")
            yield Edit("collective_spelling", "variant", "all_gather_into_tensor->all_gather list", path, _line(node),
                       lambda t, n, p, src=src: _replace_stmt(t, p, _stmts(src)))
        elif kind == "all_gather" and isinstance(call.args[0], ast.Name):
            out, inp = call.args[0].id, ast.unparse(call.args[1])
            src = (f"_gg_in = ({inp}).contiguous()\n"
                   f"_gg_flat = torch.empty((_gg_in.shape[0] * dist.get_world_size(), *_gg_in.shape[1:]), dtype=_gg_in.dtype)\n"
                   f"dist.all_gather_into_tensor(_gg_flat, _gg_in)\n"
                   f"{out} = list(_gg_flat.chunk(dist.get_world_size(), dim=0))")
            yield Edit("collective_spelling", "variant", "all_gather list->all_gather_into_tensor", path, _line(node),
                       lambda t, n, p, src=src: _replace_stmt(t, p, _stmts(src)))
        elif kind == "reduce_scatter_tensor" and isinstance(call.args[0], ast.Name) and not call.keywords:
            out, inp = call.args[0].id, ast.unparse(call.args[1])
            src = (f"_gg_full = ({inp}).clone()\ndist.all_reduce(_gg_full)\n"
                   f"_gg_n = _gg_full.shape[0] // dist.get_world_size()\n"
                   f"{out} = torch.narrow(_gg_full, 0, dist.get_rank() * _gg_n, _gg_n)")
            yield Edit("collective_spelling", "variant", "reduce_scatter->all_reduce+slice", path, _line(node),
                       lambda t, n, p, src=src: _replace_stmt(t, p, _stmts(src)))
        elif kind == "all_reduce" and isinstance(call.args[0], ast.Name):
            x = call.args[0].id
            op = _kw(call, "op")
            red = {"SUM": "sum", "MAX": "max", "MIN": "min", "AVG": "avg"}.get(
                op.value.attr if op is not None and isinstance(op.value, ast.Attribute) else "SUM")
            yield Edit("collective_spelling", "variant", "async_op+wait", path, _line(node),
                       lambda t, n, p: (_set_kw(n.value, "async_op", _expr("True")),
                                        set_at(t, p, ast.Expr(_expr(f"{ast.unparse(n.value)}.wait()")))))
            if red and not any(k.arg == "group" for k in call.keywords):
                src = f"{x} = _gg_funcol.all_reduce({x}, {red!r}, dist.group.WORLD)"

                def funcol(t, n, p, src=src):
                    _replace_stmt(t, p, _stmts(src))
                    _add_prelude(t, "import torch.distributed._functional_collectives as _gg_funcol")
                yield Edit("collective_spelling", "variant", "functional all_reduce", path, _line(node), funcol)


_DIM_METHODS = {"sum", "mean", "amax", "softmax", "log_softmax", "max", "cumsum", "unsqueeze", "squeeze", "argmax"}


def op_dim_spelling(tree, mutable):
    for path, node in mutable_nodes(tree, mutable):
        if not isinstance(node, ast.Call):
            continue
        k = _kw(node, "dim")
        subject = (node.func.value if isinstance(node.func, ast.Attribute) and not (
            isinstance(node.func.value, ast.Name) and node.func.value.id in ("torch", "F", "dist"))
            else (node.args[0] if node.args else None))
        if subject is None or ast.unparse(node.func) in ("torch.cat", "torch.stack"):
            continue
        neg = (k is not None and isinstance(k.value, ast.UnaryOp) and isinstance(k.value.op, ast.USub)
               and isinstance(k.value.operand, ast.Constant) and type(k.value.operand.value) is int)
        if neg:
            d = k.value.operand.value
            src = f"({ast.unparse(subject)}).dim() - {d}"
            yield Edit("dim_spelling", "variant", f"dim=-{d}->positive", path, _line(node),
                       lambda t, n, p, src=src: _set_kw(n, "dim", _expr(src)))
        if (isinstance(node.func, ast.Attribute) and node.func.attr in ("sum", "mean") and len(node.args) == 1
                and k is None):
            yield Edit("dim_spelling", "variant", "sum(d)->sum(dim=(d,))", path, _line(node),
                       lambda t, n, p: (_set_kw(n, "dim", ast.Tuple(elts=[n.args[0]], ctx=ast.Load())),
                                        n.args.clear()))
        if (isinstance(node.func, ast.Attribute) and node.func.attr in ("sum", "mean") and k is not None
                and not isinstance(k.value, ast.Tuple)):
            yield Edit("dim_spelling", "variant", "sum(dim=d)->sum(dim=(d,))", path, _line(node),
                       lambda t, n, p: _set_kw(n, "dim", ast.Tuple(elts=[_kw(n, "dim").value], ctx=ast.Load())))


def op_view_spelling(tree, mutable):
    for path, node in mutable_nodes(tree, mutable):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("view", "reshape"):
            if node.args and all(not isinstance(a, ast.Attribute) or a.attr != "dtype" for a in node.args):
                other = "reshape" if node.func.attr == "view" else "view"
                yield Edit("view_spelling", "variant", f"{node.func.attr}->{other}", path, _line(node),
                           lambda t, n, p, other=other: setattr(n.func, "attr", other))


OPERATORS = {
    "drop_collective": op_drop_collective,
    "duplicate_collective": op_duplicate_collective,
    "move_collective": op_move_collective,
    "reduce_op": op_reduce_op,
    "scalar": op_scalar,
    "cast_before_reduce": op_cast_before_reduce,
    "scalar_before_reduce": op_scalar_before_reduce,
    "attribute": op_attribute,
    "module_state": op_module_state,
    "reorder_gather": op_reorder_gather,
    "shift_offset": op_shift_offset,
    "process_group": op_process_group,
    "matmul_spelling": op_matmul_spelling,
    "arith_spelling": op_arith_spelling,
    "collective_spelling": op_collective_spelling,
    "dim_spelling": op_dim_spelling,
    "view_spelling": op_view_spelling,
}


def edits(tree: ast.Module, mutable: tuple[str, ...]) -> list[Edit]:
    """Every edit every operator offers on ``tree`` (deterministic order)."""
    out: list[Edit] = []
    for op in OPERATORS.values():
        out.extend(op(tree, mutable))
    return out


def apply(tree: ast.Module, edit: Edit) -> ast.Module:
    new = copy.deepcopy(tree)
    edit.apply(new, get_at(new, edit.path), edit.path)
    return ast.fix_missing_locations(new)


# ------------------------------------------------------------------------------ bug specialization


def specialize_bug(tree: ast.Module, mutable: tuple[str, ...]) -> ast.Module:
    """Fold ``if bug == ...`` branches of a built-in example for ``bug=None`` (its correct program)."""
    tree = copy.deepcopy(tree)

    class Fold(ast.NodeTransformer):
        def visit_If(self, node):
            self.generic_visit(node)
            names = {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
            if names == {"bug"}:
                taken = eval(compile(ast.Expression(node.test), "<bug>", "eval"), {"bug": None})
                return (node.body if taken else node.orelse) or [ast.Pass()]
            return node

    for i, top in enumerate(tree.body):
        if isinstance(top, (ast.FunctionDef, ast.ClassDef)) and top.name in mutable:
            tree.body[i] = Fold().visit(top)
    return ast.fix_missing_locations(tree)
