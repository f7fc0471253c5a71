"""Lemmas: named, documented rewrite rules with side conditions and their own random test cases.

A lemma looks at one operator applied to the relations of its inputs (clean expressions over
distributed values) and proposes *plans*: clean expressions whose compute pieces are the same
operator (or another one) applied to smaller arguments, e.g.

    mm(concat(a0, a1, dim=1), concat(b0, b1, dim=0))  ->  sum(mm(a0, b0), mm(a1, b1))

The engine then resolves each piece against the ranks. Lemmas never look at the ranks
themselves (except those that declare ``needs_index``), so each is an identity that can be tested
on random tensors: ``cases`` yields random instances, and tests/test_lemmas.py checks every
registered lemma on all of them (a lemma without cases fails the suite).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from gg_notebook.relations.expr import Expr, ExprStore, OpSpec


@dataclass(frozen=True)
class LemmaCase:
    """One random instance: ``spec`` applied to ``args`` (expressions over ``values``' atoms)."""

    spec: OpSpec
    args: tuple
    values: dict  # atom name -> tensor
    store: ExprStore
    description: str = ""
    ctx: object = None  # for lemmas with needs_context: what the engine would answer

    def plans(self, lemma: "Lemma", out_shape: tuple):
        """Run ``lemma`` on this case the way the engine would."""
        if not lemma.applies_to(self.spec):
            return iter(())
        if lemma.needs_context:
            return lemma.plans(self.store, self.spec, self.args, out_shape, ctx=self.ctx)
        return lemma.plans(self.store, self.spec, self.args, out_shape)


@dataclass(frozen=True)
class Lemma:
    name: str
    statement: str  # the identity, whiteboard style
    kinds: tuple[str, ...]  # OpSpec kinds it looks at ("*" for any)
    plans: Callable[[ExprStore, OpSpec, tuple, tuple], Iterator[Expr]]
    cases: Callable[[object], Iterator[LemmaCase]]
    conditions: tuple[str, ...] = ()
    bitwise_safe: bool = False  # True if the rewrite preserves floating-point results exactly
    priority: int = 50
    absorbs: tuple[str, ...] = ()  # kinds of input operators this lemma fuses (kept symbolic until then)
    needs_context: bool = False  # plans(..., ctx=engine): may ask for the partitions the inputs declare
    # A *replacing* lemma writes another formula (not the same call on pieces), so every argument of
    # the operators it rewrites matters. It declares them: ``on`` = ((OpOverload, (arguments it
    # reads and models...), (arguments that cannot change what it relies on...)), ...), covering
    # every non-tensor argument of the schema (tests/test_lemmas.py checks that), and it fires only
    # on those overloads. Empty for re-applying lemmas (the same call, all arguments kept).
    on: tuple = ()

    def applies_to(self, spec) -> bool:
        return not self.on or any(spec.target == op for op, *_ in self.on)

    def __repr__(self) -> str:
        return f"Lemma({self.name})"


REGISTRY: dict[str, Lemma] = {}


def register(lemma: Lemma) -> Lemma:
    if lemma.name in REGISTRY:
        raise ValueError(f"duplicate lemma {lemma.name}")
    REGISTRY[lemma.name] = lemma
    return lemma


def absorbed_by(consumer_kind: str) -> set[str]:
    """Kinds of producers that a lemma for ``consumer_kind`` can fuse."""
    return {k for l in lemmas_for(consumer_kind) for k in l.absorbs}


_FOR_KIND: dict[str, tuple] = {}  # kind -> (registry version, lemmas): asked at every push


def lemmas_for(kind: str) -> list[Lemma]:
    version = (len(REGISTRY), next(reversed(REGISTRY.values()), None))  # (tests register and delete lemmas)
    hit = _FOR_KIND.get(kind)
    if hit is None or hit[0] != version:
        out = [l for l in REGISTRY.values() if kind in l.kinds or "*" in l.kinds]
        hit = _FOR_KIND[kind] = (version, tuple(sorted(out, key=lambda l: (l.priority, l.name))))
    return list(hit[1])


# Matchers: decision procedures that relate a *synthetic* operator introduced by a lemma (e.g. a
# masked lookup into one vocabulary shard) to a value a rank really computes, however the rank
# spelled it. A matcher must be sound: it returns a ref only after checking the rank's term.
MATCHERS: dict[str, Callable] = {}


def register_matcher(kind: str, fn: Callable) -> Callable:
    MATCHERS[kind] = fn
    return fn
