"""``torch._foreach_*`` operators as their definition: the same operator on every tensor of the list.

Optimizers, ``clip_grad_norm_`` (on CUDA) and hand-written training steps update lists of tensors
with the multi-tensor kernels: ``torch._foreach_div_(grads, world_size)``,
``torch._foreach_mul_(grads, clip_coef)``, ``torch._foreach_norm(grads)``. Functionalized, each is
one call returning a list, an operator no lemma knows. By definition (and in PyTorch's slow path)
``_foreach_op(xs, *args)[i]`` is ``op(xs[i], *args_i)``, where a list argument (``Tensor[]``,
``Scalar[]``) contributes its i-th element and any other argument is passed as it is. `BUILTIN`
maps every functional overload of the operators below to that definition, for
`gg_notebook.ir.decompose` (used in ``exact="real"`` mode, like every decomposition: the fused
kernels may round differently). ``_foreach_norm`` is ``linalg_vector_norm`` of each tensor.
Overloads whose per-tensor argument is a tensor of scalars (``addcmul.Tensor``) are not defined
(the call stays whole).
"""

from __future__ import annotations

import torch

aten = torch.ops.aten

# _foreach_<name> -> the per-tensor function
_PER_TENSOR = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum, "clamp_max": torch.clamp_max,
    "clamp_min": torch.clamp_min, "addcmul": torch.addcmul, "addcdiv": torch.addcdiv, "lerp": torch.lerp,
    "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "neg": torch.neg, "abs": torch.abs, "exp": torch.exp,
    "log": torch.log, "reciprocal": torch.reciprocal, "sign": torch.sign, "sigmoid": torch.sigmoid,
    "norm": torch.linalg.vector_norm,
}


def _is_list_type(t) -> bool:
    return isinstance(t, torch.ListType)


def _definition(fn, schema):
    names = [a.name for a in schema.arguments]
    lists = {a.name for a in schema.arguments if _is_list_type(a.type)}
    kw_only = {a.name for a in schema.arguments if a.kwarg_only}

    def definition(*args, **kwargs):
        bound = dict(zip(names, args))
        bound.update(kwargs)
        n = {len(bound[k]) for k in lists if k in bound}
        if len(n) != 1:
            return NotImplemented
        (count,) = n
        out = []
        for i in range(count):
            pos, kw = [], {}
            for a in schema.arguments:
                if a.name not in bound:
                    continue
                v = bound[a.name][i] if a.name in lists else bound[a.name]
                if a.name in kw_only or (fn is torch.linalg.vector_norm and a.name == "dtype"):
                    kw[a.name] = v
                else:
                    pos.append(v)
            if fn is torch.linalg.vector_norm:  # (self, ord, dtype): ord positional, dtype keyword
                out.append(fn(pos[0], *(pos[1:2]), **kw))
            elif fn in (torch.maximum, torch.minimum) and not isinstance(pos[1], torch.Tensor):
                # a number: _foreach_maximum.Scalar is clamp_min (and minimum clamp_max)
                out.append((torch.clamp_min if fn is torch.maximum else torch.clamp_max)(*pos, **kw))
            elif fn in (torch.addcmul, torch.addcdiv) and len(pos) > 3:  # (self, t1, t2, value)
                out.append(fn(*pos[:3], value=pos[3], **kw))
            else:
                out.append(fn(*pos, **kw))
        return out

    return definition


def _builtin() -> dict:
    out: dict = {}
    for name, fn in _PER_TENSOR.items():
        packet = getattr(aten, f"_foreach_{name}", None)
        if packet is None:
            continue
        for ov in packet.overloads():
            op = getattr(packet, ov)
            schema = op._schema
            if schema.is_mutable or ov.endswith("out") or not schema.returns:
                continue
            if any(not _is_list_type(a.type) and isinstance(a.type, torch.TensorType) and a.name == "scalars"
                   for a in schema.arguments):
                continue  # addcmul.Tensor / addcdiv.Tensor: a tensor of per-tensor scalars
            out[op] = _definition(fn, schema)
    return out


BUILTIN = _builtin()
