"""Padding operators versus concatenation along another dim.

``slice_backward(g, sizes, dim, a, b, 1)`` (the gradient of ``x[..., a:b]``: ``g`` written into
zeros of shape ``sizes`` at ``a:b`` along ``dim``) and ``constant_pad_nd(x, pad, value)``
(``F.pad``) act on every other dim position by position, so for a concatenation along such a dim d

    slice_backward(concat(g_i, d), sizes, dim, a, b, 1) = concat(slice_backward(g_i, sizes_i, dim, a, b, 1), d)
    constant_pad_nd(concat(x_i, d), pad, v)             = concat(constant_pad_nd(x_i, pad, v), d)

where ``sizes_i`` is ``sizes`` with entry d replaced by the piece's size (``pad`` only names padded
dims, which d is not). Both sides only copy and fill, so the rewrite holds bit for bit. RoPE's
``rotate_half`` backward on attention heads split over the ranks is the first; a pad of a
non-sharded dim is the second. Declines: a step other than 1, a concatenation along the padded dim
(each piece would be padded on its own), negative padding.
"""

from __future__ import annotations

import torch

from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register
from gg_notebook.relations.expr import OpSpec, ShapeError, Slot, typed, untyped

aten = torch.ops.aten


def _with_arg(spec: OpSpec, name: str, value) -> OpSpec | None:
    """``spec`` with argument ``name`` (given positionally or by keyword) set to ``value``."""
    schema = spec.target._schema
    names = [a.name for a in schema.arguments]
    args, kwargs = spec.template
    if name in names and names.index(name) < len(args):
        i = names.index(name)
        args = args[:i] + (typed(value),) + args[i + 1:]
        return OpSpec(spec.kind, spec.name, spec.target, (args, kwargs), spec.params, spec.out, spec.unique)
    if any(k == name for k, _ in kwargs):
        kwargs = tuple((k, typed(value) if k == name else v) for k, v in kwargs)
        return OpSpec(spec.kind, spec.name, spec.target, (args, kwargs), spec.params, spec.out, spec.unique)
    return None


def _padded_dims(spec: OpSpec, ndim: int) -> set[int] | None:
    """The dims the operator pads (None: not a case this lemma decides)."""
    if spec.target is aten.slice_backward.default:
        if spec.arg("step") != 1:
            return None
        return {int(spec.arg("dim")) % ndim}
    if spec.target is aten.constant_pad_nd.default:
        pad = untyped(spec.arg("pad"))
        if not isinstance(pad, (list, tuple)) or len(pad) % 2 or len(pad) // 2 > ndim:
            return None
        if any(not isinstance(p, int) or p < 0 for p in pad):
            return None  # negative padding crops: not a pure fill
        return {ndim - 1 - k for k in range(len(pad) // 2) if pad[2 * k] or pad[2 * k + 1]}
    return None


def pad_commute(S, spec, args, out_shape):
    if not args or not isinstance(spec.arg("self" if spec.target is aten.constant_pad_nd.default else "grad_output",
                                          None), Slot):
        return
    x = args[0]
    if x.op != "cat" or len(args) != 1:
        return
    n = len(x.shape)
    padded = _padded_dims(spec, n)
    d = x.attrs
    if padded is None or d in padded:
        return
    try:
        pieces = []
        for piece in x.args:
            piece_spec = spec
            if spec.target is aten.slice_backward.default:
                sizes = list(untyped(spec.arg("input_sizes")))
                sizes[d] = piece.shape[d]
                piece_spec = _with_arg(spec, "input_sizes", tuple(int(s) for s in sizes))
                if piece_spec is None:
                    return
            pieces.append(S.call(piece_spec, [piece]))
        yield S.cat(pieces, d)
    except ShapeError:
        return


def _cases(rng):
    for _ in range(2):
        b, h, s, dh = C.dims(rng), C.dims(rng, 2, 6), C.dims(rng), 2 * C.dims(rng, 2, 4)
        g = C.randn(rng, b, h, s, dh // 2)
        half = dh // 2
        # rotate_half's backward: the gradient of x[..., half:] and of x[..., :half], heads split
        yield C.case(lambda t: aten.slice_backward(t, [b, h, s, dh], -1, half, 2**62, 1), (g,), rng,
                     split={0: 1}, description="slice_backward of the last dim, heads split")
        yield C.case(lambda t: aten.slice_backward(t, [b, h, s, dh], 3, 0, half, 1), (g,), rng,
                     split={0: 0}, description="slice_backward, rows split")
        rows = C.randn(rng, b, 2, s)
        yield C.case(lambda t: aten.slice_backward(t, [b, 5, s], 1, 1, 3, 1), (rows,), rng,
                     split={0: 2}, description="slice_backward of a middle dim, last dim split")
        x = C.randn(rng, b, h, s)
        yield C.case(lambda t: torch.nn.functional.pad(t, (1, 2)), (x,), rng, split={0: 1},
                     description="F.pad of the last dim, dim 1 split")
        yield C.case(lambda t: torch.constant_pad_nd(t, [0, 1, 2, 0], -1.5), (x,), rng, split={0: 0},
                     description="pad of two dims with a value, dim 0 split")


def decline_cases(rng):
    """Instances the lemma must not rewrite (tests/test_lemmas.py)."""
    g = C.randn(rng, 2, 4, 3)
    yield "the concatenation is along the sliced dim", C.case(
        lambda t: aten.slice_backward(t, [2, 4, 8], 2, 2, 5, 1), (g,), rng, split={0: 2})
    yield "a step", C.case(lambda t: aten.slice_backward(t, [2, 4, 6], 2, 0, 6, 2), (g,), rng, split={0: 1})
    yield "the concatenation is along the padded dim", C.case(
        lambda t: torch.nn.functional.pad(t, (1, 1)), (g,), rng, split={0: 2})


register(Lemma(
    name="pad-commute",
    statement="slice_backward(concat(g_i, d), sizes, dim, a, b) = concat(slice_backward(g_i, sizes_i, dim, a, b), d) "
              "and constant_pad_nd(concat(x_i, d), pad, v) = concat(constant_pad_nd(x_i, pad, v), d), d not padded",
    kinds=("generic",),
    plans=pad_commute,
    cases=_cases,
    conditions=("the concatenated dim is not a padded (sliced) dim", "slice_backward's step is 1",
                "no negative padding"),
    bitwise_safe=True,
    priority=20,
    on=((aten.slice_backward.default, ("input_sizes", "dim", "start", "end", "step"), ()),
        (aten.constant_pad_nd.default, ("pad", "value"), ())),
))
