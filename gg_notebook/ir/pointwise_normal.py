"""A pointwise normal form: one spelling per mathematical function, on every program alike.

Relations are matched against the ranks by term identity, so a value spelled ``x / sqrt(v)`` in the
rank program and ``x * rsqrt(v)`` in the specification (``F.rms_norm``'s decomposition) is two
values, and the proof stops there although no lemma is missing. Before lowering (in
``exact="real"`` mode only: most of these identities hold over the reals, not bit for bit),
`normalize` rewrites the captured fx graph of the sequential program and of every rank with the
same rules, so a lemma's plan does not depend on which spelling a program used. The rules, each a
real identity on every argument it accepts (anything else is left alone):

* ``x ** 3``, ``x.pow(3.0)`` -> ``(x * x) * x`` (``x ** 2`` is ``x * x`` already, in the lowering);
  ``v ** 0.5`` -> ``sqrt(v)``; ``v ** -0.5`` and ``1 / sqrt(v)`` -> ``rsqrt(v)``;
* ``a / sqrt(v)`` -> ``a * rsqrt(v)``;
* ``1 / (1 + exp(-x))`` -> ``sigmoid(x)``;
* ``x * sigmoid(x)``, ``x / (1 + exp(-x))`` -> ``silu(x)`` (with one more factor ``r`` in the
  product, any association: ``r * silu(x)``);
* ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x ** 3)))``, any association of the products,
  the constants exactly PyTorch's doubles -> ``gelu(x, approximate="tanh")``;
* ``addcmul(b, t1, t2, value=c)`` -> ``b + t1 * t2`` (``* c`` unless c == 1);
* ``var_mean(x, d, correction=0, keepdim=k)`` -> ``(mean((x - m) * (x - m), d, k), mean(x, d, k))``
  with ``m = mean(x, d, keepdim=True)``; ``var(x, d, correction=0)`` likewise (float32/float64);
* ``view_as_real(view_as_complex(x) * w)`` (complex RoPE) -> the real even/odd form
  ``stack((x[..., 0] * re(w) - x[..., 1] * im(w), x[..., 0] * im(w) + x[..., 1] * re(w)), -1)``
  (`gg_notebook.ir.complex_mul`);
* 2-norms: ``linalg_vector_norm(x)`` -> ``sqrt(sum(x * x))``, and the norm of a stack of norms as
  the root of the sum of the squares (`gg_notebook.ir.norm_rules`: ``clip_grad_norm_``'s spelling);
* ``native_layer_norm(x, shape, w, b, eps)`` whose mean and rstd outputs nothing reads (a backward
  reads them: then it stays whole), float32/float64 -> ``(x - m) * rsqrt(var + eps) * w + b`` over
  the normalized dims, with the biased ``var`` above.

Activations keep their fused operator (``silu``, ``gelu``, ``sigmoid``: elementwise, the lemmas know
them whole); norms are written out (the statistics are reductions the reduce lemmas split across
shards). Commutativity of ``mul``/``add`` between two tensors is not a rewrite of the graph: the
term store orders their operands (`commuted_args`), so ``w * y`` and ``y * w`` are one term.

A rewritten node keeps the source line and stack of the node it replaces (for the norms: the
``F.layer_norm`` call), so a culprit still points at the user's line. ``gm.meta["gg_normalized"]``
counts the rewrites per rule.
"""

from __future__ import annotations

import operator
import struct
from fractions import Fraction

import torch
import torch.fx as fx

aten = torch.ops.aten

MAX_ROUNDS = 8

# PyTorch's constants for the tanh approximation of GELU (aten/src/ATen/native/cpu/GeluKernel.cpp
# and torch._refs: kBeta = M_SQRT2 * M_2_SQRTPI * 0.5, kKappa = 0.044715). ``math.sqrt(2 / math.pi)``
# is the same double. Compared exactly: a rounded constant (0.79788) is another function.
GELU_BETA = Fraction(1.41421356237309504880 * 1.12837916709551257390 * 0.5)
GELU_KAPPA = Fraction(0.044715)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NEUTRAL_VIEWS = {aten.clone.default, aten.alias.default, aten.detach.default, aten.contiguous.default}


# ---------------------------------------------------------------------------------- commutativity
_COMMUTATIVE = {aten.mul.Tensor, aten.add.Tensor, aten.maximum.default, aten.minimum.default}


def commuted_args(spec, args: tuple) -> tuple:
    """The operands of a call in canonical order: ``a * b`` and ``b * a`` (and ``+``, ``maximum``,
    ``minimum`` of two tensors; ``add`` only with ``alpha`` 1) are the same value - bit for bit, IEEE
    addition and multiplication commute, and type promotion is symmetric - so the term store keeps
    them as one term, operands ordered by term id. Any other call is returned as given."""
    if len(args) != 2 or spec.target not in _COMMUTATIVE or args[0].id <= args[1].id:
        return args
    t_args, t_kwargs = spec.template
    if len(t_args) != 2 or getattr(t_args[0], "i", None) != 0 or getattr(t_args[1], "i", None) != 1:
        return args
    for k, v in t_kwargs:
        if k != "alpha" or getattr(v, "value", None) != 1 or isinstance(getattr(v, "value", None), bool):
            return args
    return (args[1], args[0])


# ---------------------------------------------------------------------------------- fx helpers
def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _dtype(n):
    v = _val(n)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _shape(n):
    v = _val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _is_number(c) -> bool:
    return isinstance(c, (int, float)) and not isinstance(c, bool)


def _call(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def applies_to(*targets):
    """Mark a rule that rewrites only calls of ``targets`` (its own first check says so): `_Rewriter.run`
    then asks it about those calls only. A rule without the mark is asked about every call."""
    def mark(rule):
        rule.targets = frozenset(targets)
        return rule
    return mark


def may_apply(rule, target) -> bool:
    """Can ``rule`` rewrite a call of ``target`` (`applies_to`)?"""
    targets = getattr(rule, "targets", None)
    return targets is None or target in targets


def _only_args(n: fx.Node, k: int, allowed: dict | None = None) -> bool:
    """``n`` has at most ``k`` positional arguments and only the keyword arguments in ``allowed``,
    each at its given value (e.g. ``{"alpha": 1}``)."""
    if len(n.args) > k:
        return False
    for name, v in n.kwargs.items():
        if allowed is None or name not in allowed or not _same_number(v, allowed[name]):
            return False
    return True


def _same_number(v, want) -> bool:
    return _is_number(v) and v == want


def _plain_add(n) -> bool:
    """``a + b`` with alpha 1 (``add.Tensor``)."""
    return _call(n, aten.add.Tensor) and len(n.args) >= 2 and _only_args(n, 2, {"alpha": 1})


def _plain_div(n) -> bool:
    return _call(n, aten.div.Tensor) and len(n.args) == 2 and not n.kwargs


def _plain_mul(n) -> bool:
    return _call(n, aten.mul.Tensor) and len(n.args) == 2 and not n.kwargs


def _through(n):
    """``n`` without the wrappers that do not change its value (``t * 1``, ``t / 1``, ``t + 0``,
    ``t - 0``, ``clone``, ``alias``) - the lowering drops them too, but patterns are matched before it."""
    while isinstance(n, fx.Node) and n.op == "call_function":
        src = None
        if n.target in _NEUTRAL_VIEWS and n.args:
            src = n.args[0]
        elif (_plain_mul(n) or _plain_div(n)) and _same_number(n.args[1], 1):
            src = n.args[0]
        elif (_plain_add(n) or _call(n, aten.sub.Tensor) and not n.kwargs) and len(n.args) == 2 \
                and _same_number(n.args[1], 0):
            src = n.args[0]
        if not isinstance(src, fx.Node) or _shape(src) != _shape(n) or _dtype(src) != _dtype(n):
            break
        n = src
    return n


def _product(n, dtype, depth: int = 8):
    """``n`` as ``c * prod(f ** e)``: (Fraction c, {factor node: integer e}), flattening ``mul``,
    ``div`` (by a tensor or a nonzero number), ``reciprocal`` and ``neg`` of ``dtype`` tensors; any
    other node is a factor. Real arithmetic (products reassociate)."""
    n = _through(n)
    if depth > 0 and isinstance(n, fx.Node) and n.op == "call_function" and _dtype(n) == dtype:
        if (_plain_mul(n) or _plain_div(n)) and isinstance(n.args[0], fx.Node):
            a, b = n.args
            pa = _product(a, dtype, depth - 1)
            if _is_number(b):
                if b == 0 and _plain_div(n):
                    return Fraction(1), {n: 1}
                c = Fraction(b)
                return (pa[0] / c if _plain_div(n) else pa[0] * c), pa[1]
            if not isinstance(b, fx.Node):
                return Fraction(1), {n: 1}
            pb = _product(b, dtype, depth - 1)
            sign = -1 if _plain_div(n) else 1
            if sign < 0 and pb[0] == 0:
                return Fraction(1), {n: 1}
            coef = pa[0] * (pb[0] if sign > 0 else 1 / pb[0])
            out = dict(pa[1])
            for f, e in pb[1].items():
                out[f] = out.get(f, 0) + sign * e
            return coef, {f: e for f, e in out.items() if e != 0}
        if _call(n, aten.reciprocal.default) and len(n.args) == 1:
            p = _product(n.args[0], dtype, depth - 1)
            if p[0] == 0:
                return Fraction(1), {n: 1}
            return 1 / p[0], {f: -e for f, e in p[1].items()}
        if _call(n, aten.neg.default) and len(n.args) == 1:
            p = _product(n.args[0], dtype, depth - 1)
            return -p[0], p[1]
    return Fraction(1), {n: 1}


def _one_plus_exp_neg(d):
    """x if ``d`` is ``1 + exp(-x)`` (``exp(-x) + 1``, ``torch.exp(-x).add(1)``), else None."""
    d = _through(d)
    if not _plain_add(d) or len(d.args) != 2:
        return None
    e, one = d.args
    if not _same_number(one, 1):
        return None
    e = _through(e)
    if not _call(e, aten.exp.default) or len(e.args) != 1 or _dtype(e) != _dtype(d):
        return None
    coef, fs = _product(e.args[0], _dtype(d))
    if coef != -1 or len(fs) != 1:
        return None
    (x, k), = fs.items()
    if k != 1 or _shape(x) != _shape(d) or _dtype(x) != _dtype(d):
        return None
    return x


def _sigmoid_of(f, e: int):
    """x if the factor ``f ** e`` is ``sigmoid(x)``: ``sigmoid(x) ** 1`` or ``(1 + exp(-x)) ** -1``."""
    f = _through(f)
    if e == 1 and _call(f, aten.sigmoid.default) and len(f.args) == 1:
        return f.args[0]
    if e == -1:
        return _one_plus_exp_neg(f)
    return None


# ---------------------------------------------------------------------------------- rewriting
_RESULT_META: dict = {}  # (operator, arguments' metadata and literals) -> its result's metadata
_RULES_FOR: dict = {}  # call target -> names of the rules that may rewrite it (`_Rewriter.rules_for`)


class _NoKey(Exception):
    pass


def _meta_key(a):
    """Arguments as a key: a node by its value's shape, strides, storage offset, dtype and device,
    a float by its bits; anything else unknown makes no key."""
    if isinstance(a, fx.Node):
        v = _val(a)
        if type(v) is not torch._subclasses.fake_tensor.FakeTensor or v.layout != torch.strided:
            raise _NoKey
        return ("T", tuple(v.shape), tuple(v.stride()), v.storage_offset(), v.dtype, v.device)
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, tuple(_meta_key(x) for x in a))
    if isinstance(a, dict):
        return ("d", tuple((k, _meta_key(v)) for k, v in a.items()))
    if isinstance(a, float):
        return ("f", struct.pack("<d", a))
    if a is None or isinstance(a, (bool, int, str, torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return (type(a).__name__, a)
    raise _NoKey


class _Rewriter:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = gm.graph
        self.counts: dict = gm.meta.setdefault("gg_normalized", {})
        self._mode = None

    def fake_val(self, target, args, kwargs):
        """The output of ``target`` on fake tensors with the metadata of the node arguments. An
        operator's output metadata is a function of its arguments' metadata and literals: a
        tensor-valued result is remembered by that key (`_RESULT_META`; SP's layer norms are
        rewritten alike in every layer of every rank) and made again from it."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        from gg_notebook.ir.decompose import _like, _like_meta

        if self._mode is None:
            self._mode = FakeTensorMode(allow_non_fake_inputs=False)
        try:
            key = (target, _meta_key(args), _meta_key(kwargs))
        except _NoKey:
            key = None
        meta = _RESULT_META.get(key) if key is not None else None
        if meta is not None and meta[2] == 0:  # made directly: a quarter of a dispatch through the mode
            from gg_notebook.capture.fake_memo import fresh_fake

            shape, stride, _, dtype, device = meta
            made = fresh_fake(self._mode, shape, stride, dtype, device)
            if made is not None:
                return made
        with self._mode:
            if meta is not None:
                return _like_meta(*meta)
            conv = lambda a: _like(_val(a)) if isinstance(a, fx.Node) else a  # noqa: E731
            f_args = fx.node.map_aggregate(args, conv)
            f_kwargs = fx.node.map_aggregate(kwargs, conv)
            with torch.no_grad():
                out = target(*f_args, **f_kwargs)
        if key is not None and type(out) is not tuple and isinstance(out, torch.Tensor) and out.layout == torch.strided:
            _RESULT_META[key] = (tuple(out.shape), tuple(out.stride()), out.storage_offset(), out.dtype, out.device)
        return out

    def emit(self, before: fx.Node, origin: fx.Node, target, args, kwargs=None) -> fx.Node:
        kwargs = kwargs or {}
        val = self.fake_val(target, args, kwargs)
        with self.graph.inserting_before(before):
            new = self.graph.call_function(target, tuple(args), dict(kwargs))
        new.meta["val"] = val
        for k in ("gg_source", "gg_frames", "gg_source_kind", "gg_backward", "stack_trace"):
            if k in origin.meta:
                new.meta[k] = origin.meta[k]
        new.meta.setdefault("gg_frames", [])
        new.meta.setdefault("gg_source", None)
        new.meta["gg_normal_form_of"] = str(origin.target)
        return new

    def replace(self, old: fx.Node, new: fx.Node, rule: str) -> bool:
        """Use ``new`` for ``old`` - only if it has the same shape and dtype (else ``new`` is
        dropped and False returned)."""
        if _shape(new) != _shape(old) or _dtype(new) != _dtype(old) or _shape(new) is None:
            self.erase_dead(new)
            return False
        old.replace_all_uses_with(new)
        self.counts[rule] = self.counts.get(rule, 0) + 1
        self.erase_dead(old)
        return True

    def erase_dead(self, n: fx.Node) -> None:
        stack = [n]
        while stack:
            m = stack.pop()
            if not isinstance(m, fx.Node) or getattr(m, "_erased", False) or m.users or m.op != "call_function" \
                    or m.meta.get("gg_collective") is not None:
                continue
            if not isinstance(m.target, torch._ops.OpOverload) and m.target is not operator.getitem:
                continue
            if isinstance(m.target, torch._ops.OpOverload) and (m.target.namespace != "aten" or m.target._schema.is_mutable):
                continue
            ins = [a for a in m.all_input_nodes]
            self.graph.erase_node(m)
            stack.extend(ins)

    def erase_tuple(self, n: fx.Node) -> None:
        """Erase a tuple-valued node whose getitems are all unread, with them."""
        if getattr(n, "_erased", False):
            return
        for u in list(n.users):
            if u.target is operator.getitem and not u.users:
                self.graph.erase_node(u)
        self.erase_dead(n)

    # ------------------------------------------------------------------ rules
    @applies_to(aten.pow.Tensor_Scalar)
    def rule_pow(self, n: fx.Node) -> bool:
        if not _call(n, aten.pow.Tensor_Scalar) or len(n.args) != 2 or n.kwargs:
            return False
        x, p = n.args
        dt = _dtype(n)
        if not isinstance(x, fx.Node) or dt not in _FLOATS or _dtype(x) != dt or not _is_number(p):
            return False
        if p == 3:
            sq = self.emit(n, n, aten.mul.Tensor, (x, x))
            return self.replace(n, self.emit(n, n, aten.mul.Tensor, (sq, x)), "pow3-as-mul")
        if p == 0.5:
            return self.replace(n, self.emit(n, n, aten.sqrt.default, (x,)), "pow-half-as-sqrt")
        if p == -0.5:
            return self.replace(n, self.emit(n, n, aten.rsqrt.default, (x,)), "pow-minus-half-as-rsqrt")
        return False

    @applies_to(aten.reciprocal.default, aten.div.Tensor)
    def rule_rsqrt(self, n: fx.Node) -> bool:
        """``1 / sqrt(v)`` -> ``rsqrt(v)``; ``a / sqrt(v)`` -> ``a * rsqrt(v)``."""
        if _call(n, aten.reciprocal.default) and len(n.args) == 1 and not n.kwargs:
            s = _through(n.args[0])
            if _call(s, aten.sqrt.default) and len(s.args) == 1 and _dtype(s) == _dtype(n) in _FLOATS:
                return self.replace(n, self.emit(n, n, aten.rsqrt.default, (s.args[0],)), "reciprocal-sqrt-as-rsqrt")
            return False
        if not _plain_div(n) or not isinstance(n.args[1], fx.Node):
            return False
        a, s = n.args[0], _through(n.args[1])
        if not _call(s, aten.sqrt.default) or len(s.args) != 1 or _dtype(s) not in _FLOATS:
            return False
        r = self.emit(n, s, aten.rsqrt.default, (s.args[0],))
        return self.replace(n, self.emit(n, n, aten.mul.Tensor, (a, r)), "div-sqrt-as-mul-rsqrt")

    @applies_to(aten.reciprocal.default)
    def rule_sigmoid(self, n: fx.Node) -> bool:
        """``1 / (1 + exp(-x))`` -> ``sigmoid(x)``."""
        if not _call(n, aten.reciprocal.default) or len(n.args) != 1 or _dtype(n) not in _FLOATS:
            return False
        x = _one_plus_exp_neg(n.args[0])
        if x is None or _shape(x) != _shape(n) or _dtype(x) != _dtype(n):
            return False
        return self.replace(n, self.emit(n, n, aten.sigmoid.default, (x,)), "written-sigmoid")

    @applies_to(aten.mul.Tensor, aten.div.Tensor)
    def rule_silu(self, n: fx.Node) -> bool:
        """``x * sigmoid(x)``, ``x / (1 + exp(-x))`` -> ``silu(x)``; with one more factor ``r`` in the
        product (``r * sigmoid(x) * x``, any association) -> ``r * silu(x)``."""
        if not (_plain_mul(n) or _plain_div(n)) or _dtype(n) not in _FLOATS:
            return False
        coef, fs = _product(n, _dtype(n), depth=4)
        if coef != 1 or len(fs) not in (2, 3):
            return False
        for (f, e), (g, k) in ((a, b) for a in fs.items() for b in fs.items() if a[0] is not b[0]):
            if k != 1 or _sigmoid_of(f, e) is not g or _shape(g) != _shape(n) or _dtype(g) != _dtype(n):
                continue
            rest = [(r, j) for r, j in fs.items() if r is not f and r is not g]
            if len(rest) == 1 and (rest[0][1] != 1 or not isinstance(rest[0][0], fx.Node)
                                   or _dtype(rest[0][0]) != _dtype(n)):
                continue
            silu = self.emit(n, n, aten.silu.default, (g,))
            if rest:
                silu = self.emit(n, n, aten.mul.Tensor, (rest[0][0], silu))
            if self.replace(n, silu, "written-silu"):
                return True
        return False

    @applies_to(aten.mul.Tensor, aten.div.Tensor)
    def rule_gelu_tanh(self, n: fx.Node) -> bool:
        """``0.5 * x * (1 + tanh(beta * (x + kappa * x**3)))`` -> ``gelu(x, approximate="tanh")``."""
        if not (_plain_mul(n) or _plain_div(n)) or _dtype(n) not in _FLOATS:
            return False
        dt = _dtype(n)
        coef, fs = _product(n, dt)
        if coef != Fraction(1, 2) or len(fs) != 2 or sorted(fs.values()) != [1, 1]:
            return False
        for x, q in ((a, b) for a in fs for b in fs if a is not b):
            if _shape(x) != _shape(n) or _dtype(x) != dt:
                continue
            q = _through(q)
            if not _plain_add(q) or len(q.args) != 2 or not _same_number(q.args[1], 1):
                continue
            t = _through(q.args[0])
            if not _call(t, aten.tanh.default) or len(t.args) != 1 or _dtype(t) != dt:
                continue
            beta, inner = _product(t.args[0], dt)
            if beta != GELU_BETA or len(inner) != 1:
                continue
            (s, e), = inner.items()
            s = _through(s)
            if e != 1 or not _plain_add(s) or len(s.args) != 2 or not all(isinstance(a, fx.Node) for a in s.args):
                continue
            forms = [_product(a, dt) for a in s.args]
            want = [(Fraction(1), {x: 1}), (GELU_KAPPA, {x: 3})]
            if forms == want or forms == want[::-1]:
                return self.replace(n, self.emit(n, n, aten.gelu.default, (x,), {"approximate": "tanh"}),
                                    "written-gelu-tanh")
        return False

    @applies_to(aten.addcmul.default)
    def rule_addcmul(self, n: fx.Node) -> bool:
        if not _call(n, aten.addcmul.default) or len(n.args) != 3 or set(n.kwargs) - {"value"}:
            return False
        b, t1, t2 = n.args
        value = n.kwargs.get("value", 1)
        dt = _dtype(n)
        if not _is_number(value) or dt not in _FLOATS or any(_dtype(a) != dt for a in (b, t1, t2)):
            return False
        prod = self.emit(n, n, aten.mul.Tensor, (t1, t2))
        if value != 1:
            prod = self.emit(n, n, aten.mul.Tensor, (prod, value))
        return self.replace(n, self.emit(n, n, aten.add.Tensor, (b, prod)), "addcmul-as-add-mul")

    def _biased_var(self, n: fx.Node, x: fx.Node, dims: list, keepdim: bool):
        mean_k = self.emit(n, n, aten.mean.dim, (x, dims, True))
        xc = self.emit(n, n, aten.sub.Tensor, (x, mean_k))
        sq = self.emit(n, n, aten.mul.Tensor, (xc, xc))
        var = self.emit(n, n, aten.mean.dim, (sq, dims, keepdim))
        mean = mean_k if keepdim else self.emit(n, n, aten.mean.dim, (x, dims, False))
        return var, mean, xc

    def _var_args(self, n: fx.Node):
        """(x, dims, keepdim) of ``var``/``var_mean`` with correction 0 on a float tensor, else None."""
        if not _call(n, aten.var_mean.correction, aten.var.correction) or len(n.args) > 2:
            return None
        if set(n.kwargs) - {"dim", "correction", "keepdim"}:
            return None
        x = n.args[0]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        correction = n.kwargs.get("correction")
        if not isinstance(x, fx.Node) or _dtype(x) not in (torch.float32, torch.float64):
            return None
        if correction is None or not _same_number(correction, 0):  # None is the unbiased default
            return None
        nd = len(_shape(x))
        if nd == 0:
            return None
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            dims = list(range(nd))
        elif isinstance(dim, int):
            dims = [dim % nd]
        else:
            dims = sorted({int(d) % nd for d in dim})
        return x, dims, bool(n.kwargs.get("keepdim", False))

    @applies_to(aten.var_mean.correction, aten.var.correction)
    def rule_var(self, n: fx.Node) -> bool:
        got = self._var_args(n)
        if got is None:
            return False
        x, dims, keepdim = got
        if n.target is aten.var.correction:
            var, _, _ = self._biased_var(n, x, dims, keepdim)
            return self.replace(n, var, "biased-var-written")
        outs = _getitems(n)
        if outs is None:
            return False
        var, mean, _ = self._biased_var(n, x, dims, keepdim)
        for k, users in outs.items():
            for u in users:
                self.replace(u, var if k == 0 else mean, "biased-var_mean-written")
        self.erase_tuple(n)
        return True

    @applies_to(aten.native_layer_norm.default)
    def rule_layer_norm(self, n: fx.Node) -> bool:
        if not _call(n, aten.native_layer_norm.default) or len(n.args) != 5 or n.kwargs:
            return False
        x, shape, w, b, eps = n.args
        dt = _dtype(x)
        if not isinstance(x, fx.Node) or dt not in (torch.float32, torch.float64) or not _is_number(eps):
            return False
        if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) for s in shape) or not shape:
            return False
        xs = _shape(x)
        k = len(shape)
        if len(xs) < k or tuple(xs[len(xs) - k:]) != tuple(shape):
            return False
        for p in (w, b):
            if p is not None and (not isinstance(p, fx.Node) or _dtype(p) != dt or _shape(p) != tuple(shape)):
                return False
        outs = _getitems(n)
        if outs is None or set(outs) - {0}:
            return False  # the mean and rstd outputs are read (a backward): the fused op stays
        dims = list(range(len(xs) - k, len(xs)))
        var, _, xc = self._biased_var(n, x, dims, True)
        rstd = self.emit(n, n, aten.rsqrt.default, (self.emit(n, n, aten.add.Tensor, (var, eps)),))
        y = self.emit(n, n, aten.mul.Tensor, (xc, rstd))
        if w is not None:
            y = self.emit(n, n, aten.mul.Tensor, (y, w))
        if b is not None:
            y = self.emit(n, n, aten.add.Tensor, (y, b))
        for u in outs.get(0, []):
            self.replace(u, y, "layer_norm-written")
        self.erase_tuple(n)
        return True

    @applies_to(aten.view_as_real.default)
    def rule_complex_mul(self, n: fx.Node) -> bool:
        """``view_as_real(view_as_complex(x) * w)`` -> ``stack((xr * wr - xi * wi, xr * wi + xi * wr), -1)``
        (see `gg_notebook.ir.complex_mul`)."""
        from gg_notebook.ir.complex_mul import rewrite_complex_mul

        return rewrite_complex_mul(self, n)

    def rule_norms(self, n: fx.Node) -> bool:
        """2-norms in one spelling, ``sqrt(sum(x * x))`` (see `gg_notebook.ir.norm_rules`)."""
        from gg_notebook.ir.norm_rules import RULES

        return any(rule(self, n) for rule in RULES if may_apply(rule, n.target))

    RULES = ("rule_pow", "rule_sigmoid", "rule_rsqrt", "rule_silu", "rule_gelu_tanh", "rule_addcmul", "rule_var",
             "rule_layer_norm", "rule_complex_mul", "rule_norms")

    def rules_for(self, target) -> list:
        """The rules (bound, in `RULES` order) that may rewrite a call of ``target`` (`applies_to`)."""
        rules = _RULES_FOR.get(target)
        if rules is None:
            from gg_notebook.ir.norm_rules import RULES as NORM_RULES

            rules = _RULES_FOR[target] = [
                name for name in self.RULES
                if (any(may_apply(r, target) for r in NORM_RULES) if name == "rule_norms"
                    else may_apply(getattr(type(self), name), target))]
        return [getattr(self, name) for name in rules]

    def run(self) -> int:
        total = 0
        for _ in range(MAX_ROUNDS):
            changed = 0
            for n in list(self.graph.nodes):
                if n.graph is None or n.op != "call_function" or n.meta.get("gg_collective") is not None:
                    continue
                for rule in self.rules_for(n.target):
                    try:
                        done = rule(n)
                    except Exception:  # noqa: BLE001 - a call these rules cannot read: left as it is
                        done = False
                    if done:
                        changed += 1
                        break
            total += changed
            if not changed:
                break
        if total:
            self.graph.lint()
        return total


def _getitems(n: fx.Node):
    """{output index: [getitem nodes that are read]} for a tuple-valued node whose every user is a
    getitem (dead getitems left out); None otherwise."""
    out: dict = {}
    for u in list(n.users):
        if u.op != "call_function" or u.target is not operator.getitem:
            return None
        if u.users:
            out.setdefault(u.args[1], []).append(u)
    return out


def normalize(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` in place into the pointwise normal form (module docstring); the number of
    rewrites."""
    return _Rewriter(gm).run()


__all__ = ["GELU_BETA", "GELU_KAPPA", "commuted_args", "normalize"]
