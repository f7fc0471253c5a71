"""Exhaustive evaluation of integer index arithmetic over its whole domain.

Vocab-parallel code turns token ids into shard-local ids and masks with elementwise integer ops
(``ids < start``, ``ids - start``, ``x[mask] = 0``...), written differently by every framework.
Instead of matching spellings, we evaluate such an elementwise term on *every* possible id
(``arange(V)``, the ids a sequential embedding/cross-entropy accepts): agreement on the whole
domain is a proof, not a test.
"""

from __future__ import annotations

import torch

from gg_notebook.relations.expr import Expr

_ELEMENTWISE_GENERIC = {"aten.index_put.default", "aten.index_put_.default"}


def eval_on_domain(term: Expr, var: Expr, values: torch.Tensor) -> torch.Tensor | None:
    """Evaluate elementwise ``term`` with ``var`` bound to ``values`` (1-D); None if ``term``
    depends on anything but ``var`` and constants, or uses a non-elementwise operator."""
    memo: dict[int, torch.Tensor] = {var.id: values}
    target_shape = var.shape

    def go(x: Expr):
        if x.id in memo:
            return memo[x.id]
        if x.op == "const":
            v = x.attrs.call([])
            if v.dim() != 0 and tuple(v.shape) != tuple(target_shape) and v.numel() != 1:
                return None
            r = v.reshape(()) if v.numel() == 1 else None
            if r is None:
                return None
        elif x.op == "call":
            spec = x.attrs
            if spec.kind != "ew" and spec.name not in _ELEMENTWISE_GENERIC:
                return None
            if spec.unique is not None:
                return None
            for a in x.args:
                if a.op != "const" and tuple(a.shape) != tuple(target_shape):
                    return None
            vals = []
            for a in x.args:
                v = go(a)
                if v is None:
                    return None
                vals.append(v)
            try:
                r = spec.call(vals)
            except Exception:  # noqa: BLE001 - not evaluable on the domain
                return None
        else:
            return None
        memo[x.id] = r
        return r

    return go(term)
