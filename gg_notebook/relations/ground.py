"""Input-independent values, compared by value.

Position ids (``torch.arange(r * n, (r + 1) * n)``), causal and block masks built from shapes and
the rank, rotary tables (``inv_freq``, ``torch.outer(t, inv_freq)``, cos/sin, ``torch.polar``):
whatever a program computes without reading its inputs is *ground* (no ``atom``/``ref`` leaf, no
random operator). Compared by its spelling, ``arange(0, 8)[4:8]``, ``arange(4, 8)`` and
``arange(8) + 4`` would be three different values. Here every ground node is evaluated when it is
interned (`canonical`, called from `ExprStore._intern`) and replaced by one *value node*: a
``const`` whose `OpSpec` target is a `Value`, keyed by (dtype, shape, exact bytes). Equal values are
one node whatever their spelling; a slice, view, concatenation... of a value node is evaluated in
turn, so a rank's rows of a table are the value node of those rows; `value_tiling` finds which
values the ranks hold that tile a sequential value (rank r holds rows [r*n, (r+1)*n)).

What "equal" means: the same dtype, the same shape and the same bytes, compared bitwise, on values
computed on CPU by PyTorch's reference kernels (the semantics the rest of the tool, the simulator
and translation validation included, also evaluates on). So ``0.0`` and ``-0.0`` are different
values, and two NaNs are equal only with the same payload: an operator given equal bits returns
equal bits, which is all the merge needs; nothing is ever equal "up to rounding": a rotary table
computed in another order that differs in the last bit is another value (the proof then needs a
lemma, or ends unknown: never a false proof).

What is not canonicalized (kept as today: a structural term compared by its spelling):

* random operators (``spec.unique`` set: rand, dropout masks, uninitialized ``empty``) and
  anything computed from them; operators that read memory layout rather than values (``as_strided``);
* values larger than `MAX_ELEMENTS` elements (meta-sized benchmark problems never allocate them),
  operators whose work estimate exceeds `MAX_WORK`, and everything once a store has kept
  `MAX_BYTES` bytes of values;
* ``scale`` nodes and floating-point ``accum`` nodes: the expression language's own arithmetic,
  whose rounding a real backend does not promise (an all-reduce sums in its own order);
* anything whose evaluation fails, is not a dense CPU tensor, or disagrees with the recorded
  shape/dtype (a meta constant, a quantized or sparse tensor).
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from gg_notebook.relations.expr import Expr, ExprStore

MAX_ELEMENTS = 2 ** 22  # largest value (elements) evaluated and stored
MAX_WORK = 2 ** 28  # largest work estimate (multiply-adds) of one evaluation
MAX_BYTES = 1 << 30  # values a store keeps, in total
_EVALUATED = frozenset({"const", "call", "view", "permute", "slice", "cat", "expand", "accum"})
# operators whose result depends on the argument's memory layout, not only its value (a value node
# is stored contiguous; the program's tensor may be a strided view)
_LAYOUT_DEPENDENT = frozenset({"as_strided", "as_strided_copy", "as_strided_", "as_strided_scatter", "set_",
                               "resize_", "resize", "resize_as_", "_reshape_alias_copy"})


class Value:
    """The target of a value node's `OpSpec`: calling it gives (a copy of) the value.

    Two `Value`s are equal iff they have the same dtype, shape and bytes."""

    __slots__ = ("tensor", "digest", "shape", "dtype", "_bytes", "_uniform")

    def __init__(self, tensor: torch.Tensor, digest: str, raw: torch.Tensor, uniform: bool):
        self.tensor = tensor
        self.digest = digest
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype
        self._bytes = raw  # the value's bytes (uint8, 1-D): exact comparison on a digest hit
        self._uniform = uniform

    @property
    def uniform(self) -> bool:
        """Every element has the same bytes (zeros, ones, a full(...) tensor; True if empty)."""
        return self._uniform

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.tensor.clone()

    def constant_fill(self):
        """The number every element equals, for the scalar normal form (relations/linear.py); None
        unless the value is uniform and floating. A float16/bfloat16/float32 element is read as the
        simplest rational that rounds to it (``float32(1/12)`` reads as 1/12, as ``ones / 12`` spelled
        out does); a float64 element as itself."""
        if not self._uniform or self.tensor.numel() == 0 or not self.dtype.is_floating_point:
            return None
        v = self.tensor.reshape(-1)[0].item()
        if self.dtype == torch.float64 or not math.isfinite(v):
            return v
        from fractions import Fraction

        exact = Fraction(v)
        for bound in (1 << 8, 1 << 12, 1 << 16, 1 << 20, 1 << 24):
            c = exact.limit_denominator(bound)
            if torch.tensor(float(c), dtype=self.dtype).item() == v:
                return float(c)
        return v

    def __eq__(self, other) -> bool:
        return (isinstance(other, Value) and self.digest == other.digest and self.shape == other.shape
                and self.dtype == other.dtype and torch.equal(self._bytes, other._bytes))

    def __hash__(self) -> int:
        return hash((self.digest, self.shape))

    def __repr__(self) -> str:
        return f"Value({describe(self.tensor)})"

    def __reduce__(self):
        return (_value_of, (self.tensor,))


def _value_of(t: torch.Tensor) -> "Value":
    v = _as_value(t)
    if v is None:
        raise ValueError("not a value tensor")
    return v


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _as_value(t) -> Value | None:
    if (not isinstance(t, torch.Tensor) or t.is_meta or t.device.type != "cpu" or t.layout != torch.strided
            or t.is_quantized):
        return None
    # (a contiguous result may share memory with its argument's value: values are never written,
    # and `Value.__call__` hands out copies)
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    raw = _raw(t)
    buf = raw.numpy()
    # a fast checksum of the bytes, not a cryptographic hash: equal digests are confirmed byte for
    # byte before two values are merged (`Value.__eq__`, `canonical`), so a collision costs a merge,
    # never a wrong one (one pass of CRC-32 over a [S, S] mask: a second checksum doubled its cost)
    digest = f"{zlib.crc32(buf):08x}{raw.numel():x}"
    return Value(t, digest, raw, _same_bytes_everywhere(raw, t.element_size()))


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bytes_everywhere(raw: torch.Tensor, size: int) -> bool:
    """Does every element have the same bytes (``raw``: the value's bytes, ``size`` per element)?"""
    if raw.numel() <= size:
        return True
    if size in _INT_OF_SIZE:
        words = raw.view(_INT_OF_SIZE[size])
        n = words.numel()
        # the common non-uniform cases (a triangular mask, positions) without a full pass: a strided
        # sample of about 64 elements (its last one included) first
        sample = words[(n - 1) % max(1, n // 64)::max(1, n // 64)]
        if bool((sample != words[0]).any()):
            return False
        return bool((words == words[0]).all())
    rows = raw.view(-1, size)
    return bool((rows == rows[0]).all())


def is_value(e: "Expr") -> bool:
    """True if ``e`` is a canonical value node."""
    return e.op == "const" and isinstance(getattr(e.attrs, "target", None), Value)


def value_of(e: "Expr") -> torch.Tensor | None:
    """The tensor of a value node (not a copy: do not modify it); None for any other node."""
    return e.attrs.target.tensor if is_value(e) else None


# ---------------------------------------------------------------------- canonicalization
def canonical(store: "ExprStore", op: str, attrs, args, shape, dtype) -> "Expr | None":
    """The value node equal to the ground node (op, attrs, args) about to be interned in ``store``,
    or None to intern the node as it is (not ground, random, too large, not evaluable)."""
    if op not in _EVALUATED:
        return None
    if op == "const" and isinstance(getattr(attrs, "target", None), Value):
        return None  # a value node itself
    if any(not is_value(a) for a in args):
        return None  # a structural (too large, random...) argument: keep the spelling
    if op in ("const", "call") and getattr(attrs, "unique", None) is not None:
        return None  # random (or uninitialized memory): never equal to anything else
    if op == "call" and _packet(attrs.target) in _LAYOUT_DEPENDENT:
        return None
    if op == "accum" and (dtype is None or dtype.is_floating_point or dtype.is_complex):
        return None  # the rounding of a real reduction is the backend's: keep it structural
    numel = math.prod(int(s) for s in shape)
    if numel > MAX_ELEMENTS or _work(op, attrs, args, numel) > MAX_WORK:
        return None
    budget = getattr(store, "_value_bytes", 0)
    if budget > MAX_BYTES:
        return None
    try:
        out = _evaluate(op, attrs, [value_of(a) for a in args])
    except Exception:  # noqa: BLE001 - not evaluable here: keep the spelling
        return None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        return None
    v = _as_value(out)
    if v is None:
        return None
    table = store.__dict__.setdefault("_values", {})
    key = (v.dtype, v.shape, v.digest)
    node = table.get(key)
    if node is not None and node.attrs.target == v:
        return node
    if node is not None:  # a digest collision: never merge different bytes
        return None
    from gg_notebook.relations.expr import OpSpec

    spec = OpSpec("const", describe(v.tensor, v.uniform), v, ((), ()))
    node = store.const(spec, v.shape, v.dtype)
    table[key] = node
    store._value_bytes = budget + v.tensor.numel() * v.tensor.element_size()
    return node


def _mutates(target) -> bool:
    schema = getattr(target, "_schema", None)
    if schema is None:
        return True  # not an ATen operator: assume the worst
    return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _packet(target) -> str:
    try:
        return target.overloadpacket.__name__
    except AttributeError:
        return getattr(target, "__name__", "")


def _work(op: str, attrs, args, numel: int) -> int:
    """A rough upper bound of the multiply-adds one evaluation costs."""
    if op == "call" and getattr(attrs, "kind", None) == "matmul" and args:
        inner = max((int(a.shape[-1]) for a in args if a.shape), default=1)
        return numel * inner
    return numel + sum(math.prod(a.shape) for a in args)


def _evaluate(op: str, attrs, vals: list) -> torch.Tensor:
    from gg_notebook.relations.expr import apply_op

    if op == "const":
        return _call_on_cpu(attrs, [])
    if op == "call":
        return _call_on_cpu(attrs, vals)
    return apply_op(op, attrs, vals)


def _call_on_cpu(spec, vals) -> torch.Tensor:
    """``spec`` called on ``vals``, a factory's ``device`` argument (``device=x.device`` of a
    meta or GPU tensor) taken as the CPU: the value does not depend on where it is computed."""
    from gg_notebook.relations.expr import _fill

    args, kwargs = spec.template
    if vals and _mutates(spec.target):
        vals = [v.clone() for v in vals]  # an in-place operator must not write a stored value
    kw = {k: _fill(v, vals) for k, v in kwargs}
    if "device" in kw:
        kw["device"] = torch.device("cpu")
    if "pin_memory" in kw:
        kw["pin_memory"] = False
    with torch.no_grad():
        out = spec.target(*_fill(args, vals), **kw)
    if spec.out is not None:
        out = out[spec.out]
    return out


# ---------------------------------------------------------------------- tilings across ranks
def value_tiling(index, term: "Expr") -> list:
    """Ways to rebuild the value node ``term`` by concatenating values the ranks hold, found by
    value: [(dim, [dvals])] (one tiling per dim, the fewest pieces first). A uniform value (every
    element equal) is tiled only by copies of one held piece of it, the largest that divides it."""
    memo = index.__dict__.setdefault("_value_tilings", {})
    hit = memo.get(term.id)
    if hit is not None:
        return hit
    memo[term.id] = out = []
    want = value_of(term)
    if want is None or want.dim() == 0 or want.numel() < 2:
        return out
    uniform = term.attrs.target.uniform
    if uniform and not bool(want.reshape(-1)[0]):
        return out  # zeros stay a constant: x + 0 is x (the store's normal form), a rank's zeros are not
    pieces = _held_values(index).get((want.dtype, want.dim()), [])
    for dim in range(want.dim()):
        cands = [d for d in pieces if _fits(d.term.shape, want.shape, dim)]
        if uniform:
            # every slice of a uniform value is the same constant: tile it with copies of the
            # largest held piece of that constant (the seed of a sum's backward, split by the ranks)
            cands = [d for d in cands if d.term.attrs.target.uniform and want.shape[dim] % d.term.shape[dim] == 0]
            cands = sorted(cands, key=lambda d: -d.term.shape[dim])[:1]
        if not cands:
            continue
        chosen = _tile(want, dim, cands)
        if chosen is not None and len(chosen) > 1:
            out.append((dim, chosen))
    return out


def _held_values(index) -> dict:
    """The ranks' value nodes, by (dtype, ndim)."""
    held = index.__dict__.get("_held_values")
    if held is None:
        held = {}
        for d in index.dvals:
            v = value_of(d.term)
            if v is not None and v.dim() > 0:
                held.setdefault((v.dtype, v.dim()), []).append(d)
        index._held_values = held
    return held


def _fits(piece: tuple, whole: tuple, dim: int) -> bool:
    return (len(piece) == len(whole) and 0 < piece[dim] < whole[dim]
            and all(piece[i] == whole[i] for i in range(len(whole)) if i != dim))


def _tile(want: torch.Tensor, dim: int, cands: list):
    """Pieces (dvals) whose values, concatenated along ``dim``, are ``want`` bit for bit: a
    depth-first search over offsets, longer pieces first; None if there is none."""
    by_len: dict[int, dict[str, list]] = {}
    for d in cands:
        v = d.term.attrs.target
        by_len.setdefault(d.term.shape[dim], {}).setdefault(v.digest, []).append(d)
    lengths = sorted(by_len, reverse=True)
    size = want.shape[dim]
    dead: set[int] = set()

    def go(cur: int):
        if cur == size:
            return []
        if cur in dead:
            return None
        for n in lengths:
            if cur + n > size:
                continue
            part = _as_value(want.narrow(dim, cur, n))
            for d in by_len[n].get(part.digest, []):
                if d.term.attrs.target == part:
                    rest = go(cur + n)
                    if rest is not None:
                        return [d] + rest
        dead.add(cur)
        return None

    return go(0)


# ---------------------------------------------------------------------- printing
def describe(t: torch.Tensor, uniform: bool | None = None) -> str:
    """A short, deterministic rendering of a value (a function of dtype, shape and contents)."""
    dt = str(t.dtype).replace("torch.", "")
    shape = "x".join(str(s) for s in t.shape) or "scalar"
    if t.numel() == 0:
        return f"{dt}[{shape}] empty"
    flat = t.reshape(-1)
    if t.dim() == 1 and t.numel() >= 3 and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool:
        step = int(flat[1] - flat[0])
        if step != 0 and torch.equal(flat, flat[0] + step * torch.arange(t.numel(), dtype=t.dtype)):
            first = int(flat[0])
            return f"{dt}[{shape}] arange({first}, {first + step * t.numel()}" + (f", {step})" if step != 1 else ")")
    if t.numel() <= 6:
        vals = ", ".join(_num(x) for x in flat.tolist())
        return f"{dt}[{shape}] [{vals}]"
    if _uniform(t) if uniform is None else uniform:
        return f"{dt}[{shape}] full {_num(flat[0].item())}"
    digest = f"{zlib.crc32(_raw(t.contiguous()).numpy()):08x}"  # (no copy of the bytes)
    return f"{dt}[{shape}] #{digest}"


def _uniform(t: torch.Tensor) -> bool:
    return _same_bytes_everywhere(_raw(t.contiguous()), t.element_size())


def _num(x) -> str:
    if isinstance(x, float):
        return repr(x)
    return str(x)


# ---------------------------------------------------------------------- broadcast operands
def broadcast_shapes(*shapes) -> tuple:
    """`torch.broadcast_shapes` of concrete shapes (tuples of ints), in plain Python (the torch one
    goes through symbolic-shape guards: the cost of every elementwise call the store builds).
    Raises RuntimeError where torch does."""
    n = max((len(s) for s in shapes), default=0)
    out = [1] * n
    for s in shapes:
        off = n - len(s)
        for j, d in enumerate(s):
            d = int(d)
            if d < 0:
                raise RuntimeError(f"negative size in {shapes}")
            o = out[off + j]
            if d == o or d == 1:
                continue
            if o != 1:
                raise RuntimeError(f"shapes {shapes} do not broadcast")
            out[off + j] = d
    return tuple(out)


def minimal_broadcast(store: "ExprStore", spec, args) -> tuple | None:
    """The arguments of the elementwise call ``spec(args)`` with every value-node operand in its
    smallest broadcast form, or None if nothing changes: leading size-1 dims dropped, and a dim
    along which the value is constant cut to size 1, as long as the other operands keep the output
    shape. ``cos[None, :, None, :]`` ([1, S, 1, D]), ``cos[:, None, :]`` ([S, 1, D]) and a table
    expanded over the batch ([B, S, 1, D]) then make one call: the same value at every output
    position, so the rewrite is exact (bit for bit)."""
    if getattr(spec, "kind", None) != "ew" or len(args) < 2 or \
            not any(a.op == "expand" or a.op == "view" or is_value(a) for a in args):
        return None
    shapes = [tuple(a.shape) for a in args]
    if all(s == shapes[0] for s in shapes) and not any(a.op == "expand" or is_value(a) for a in args):
        return None  # no broadcasting at all (the common case): a view of the full shape stays
    try:
        out = broadcast_shapes(*shapes)
    except RuntimeError:
        return None
    memo = store.__dict__.setdefault("_min_bcast", {})
    new, changed = [], False
    for i, a in enumerate(args):
        # the operands as they stand (those before i already shrunk): shrinking two operands that
        # each alone keep the output shape must not shrink the output
        current = [tuple(b.shape) for b in new] + [tuple(b.shape) for b in args[i:]]
        if not is_value(a):
            inner = _unbroadcast(a)
            if inner is not None:
                others = [s for j, s in enumerate(current) if j != i]
                try:
                    if broadcast_shapes(tuple(inner.shape), *others) == out:
                        a, changed = inner, True  # the other operands broadcast it the same way
                except RuntimeError:
                    pass
            new.append(a)
            continue
        others = [s for j, s in enumerate(current) if j != i]
        key = (a.id, out, tuple(others))
        hit = memo.get(key)
        if hit is None:
            hit = memo[key] = _shrink(store, a, out, others) or a
        new.append(hit)
        changed = changed or hit is not a
    return tuple(new) if changed else None


def _unbroadcast(a: "Expr") -> "Expr | None":
    """X for an operand that is X broadcast (``expand``) or X with leading size-1 dims (a view)."""
    if a.op == "expand":
        return a.args[0]
    if a.op == "view":
        x = a.args[0]
        k = len(a.shape) - len(x.shape)
        if k > 0 and tuple(a.shape[k:]) == tuple(x.shape) and all(n == 1 for n in a.shape[:k]):
            return x
    return None


def _shrink(store: "ExprStore", a: "Expr", out: tuple, others: list) -> "Expr | None":
    t = value_of(a)
    if t.numel() > MAX_ELEMENTS or t.dim() == 0:
        return None
    n = len(out)
    need = [1] * n  # the output size each dim keeps from the other operands alone
    for s in others:
        for j, size in enumerate(s):
            k = j + n - len(s)
            need[k] = max(need[k], size)
    x = t
    for j in range(x.dim()):
        k = j + n - x.dim()
        if x.shape[j] > 1 and need[k] == out[k]:
            first = x.narrow(j, 0, 1)
            if not torch.equal(_raw_rows(x.narrow(j, 1, 1)), _raw_rows(first)):
                continue  # the second slice already differs (the usual case: a cheap answer)
            if torch.equal(_raw_rows(x), _raw_rows(first.expand_as(x))):
                x = first
    others_nd = max((len(s) for s in others), default=0)
    while x.dim() > 0 and x.shape[0] == 1 and others_nd >= x.dim():  # the others keep the output's rank
        x = x.reshape(tuple(x.shape[1:]))
    if tuple(x.shape) == tuple(t.shape):
        return None
    try:
        if broadcast_shapes(tuple(x.shape), *others) != out:
            return None
    except RuntimeError:
        return None
    return _value_node(store, x.contiguous())


def _raw_rows(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().reshape(-1).view(torch.uint8)


def _value_node(store: "ExprStore", t: torch.Tensor) -> "Expr | None":
    v = _as_value(t)
    if v is None:
        return None
    table = store.__dict__.setdefault("_values", {})
    key = (v.dtype, v.shape, v.digest)
    node = table.get(key)
    if node is not None:
        return node if node.attrs.target == v else None
    from gg_notebook.relations.expr import OpSpec

    spec = OpSpec("const", describe(v.tensor, v.uniform), v, ((), ()))
    node = store.const(spec, v.shape, v.dtype)
    table[key] = node
    store._value_bytes = getattr(store, "_value_bytes", 0) + v.tensor.numel() * v.tensor.element_size()
    return node


# ---------------------------------------------------------------------- lookups by constant ids
def canonical_call(store: "ExprStore", spec, args) -> "Expr | None":
    """A data-movement term for ``embedding(w, ids)`` with constant ids, or None: the table rows
    ``w[a:b]`` when the ids are ``arange(a, b)`` (position embeddings of one sequence shard, however
    the positions were built), and the lookup of the first row of ids broadcast over the dims along
    which the ids are constant (``arange(...).expand(batch, -1)``). A lookup copies rows, so both are
    exact (bit for bit); ids out of the table's range are left alone (the lookup fails there)."""
    import torch as _t

    if spec.target is not _t.ops.aten.embedding.default or len(args) != 2:
        return None
    wi, ii = spec.slot_of("weight"), spec.slot_of("indices")
    if wi is None or ii is None:
        return None
    w, ids = args[wi], args[ii]
    t = value_of(ids)
    if t is None or len(w.shape) != 2 or t.dtype not in (_t.int64, _t.int32) or t.numel() == 0:
        return None
    n = w.shape[0]
    if int(t.min()) < 0 or int(t.max()) >= n:
        return None
    lead = 0  # leading dims along which every row of ids is the same
    while lead < t.dim() - 1 and t.shape[lead] > 1 and _t.equal(t, t.narrow(lead, 0, 1).expand_as(t)):
        lead += 1
    while lead < t.dim() - 1 and t.shape[lead] == 1:
        lead += 1
    if lead:
        row = t
        for _ in range(lead):
            row = row[0]
        inner_ids = _value_node(store, row.contiguous())
        if inner_ids is None:
            return None
        new = list(args)
        new[ii] = inner_ids
        inner = store.call(spec, new)
        return store.expand(inner, tuple(t.shape) + (w.shape[1],))
    if t.dim() == 1:
        a = int(t[0])
        if _t.equal(t, _t.arange(a, a + t.numel(), dtype=t.dtype)):
            return store.slice(w, 0, a, a + t.numel())
    return None
