"""Exact real constants beyond the rationals: products of a rational and rational powers of primes.

The scalar normal form (relations/linear.py) multiplies and compares coefficients exactly. Rational
coefficients cover ``x / 4``, ``x.mean()``, ``ReduceOp.AVG``; attention brings square and fourth
roots: a spec divides the scores by ``math.sqrt(d)`` (or multiplies by ``d ** -0.5``, or by
``1 / math.sqrt(d)``), and ``F.scaled_dot_product_attention``'s math form multiplies q *and* k by
``sqrt(scale)`` = ``d ** -0.25``. Read as the nearest binary fractions these are unrelated numbers
(``float(d ** -0.25) ** 2 != 1 / float(math.sqrt(d))`` as rationals); read as the real numbers the
program spells, ``(d ** -1/4) ** 2 == d ** -1/2`` exactly.

A `Radical` is ``q * p1^e1 * p2^e2 * ...`` with ``q`` a nonzero `Fraction`, the ``p`` distinct primes
and every exponent a `Fraction` strictly between 0 and 1: a unique representation, so two radicals
are equal exactly when they are the same real number (products of powers of distinct primes with
exponents in (0, 1) are linearly independent over the rationals). Products and quotients are
exact; a product without radicals is returned as a plain `Fraction`. A sum of two numbers is only
defined when it is again one monomial (the same radical part); otherwise `Inexpressible` is raised
and the caller gives up on that normal form (an answer "not known", never a wrong one).

`read_float` decides which real number a float literal spells: a float ``v`` is read as the radical
``r ** (1/k)`` (k = 2 or 4, r a rational with a small numerator and denominator) when ``v`` is within
a few units in the last place of it - the error of computing it with one or two correctly rounded
operations (``math.sqrt``, ``1 / x``, ``x ** -0.5``). Floats that are (close to) a short rational are
read as that rational by `linear.coefficient` before this reading is tried.
"""

from __future__ import annotations

import math
from fractions import Fraction

from gg_notebook.relations.expr import ShapeError

MAX_RADICAND = 1 << 16  # numerator and denominator of r in r ** (1/k)
ULPS = 4  # how far (in units in the last place) a float may be from the radical it is read as
_EPS = 2.0 ** -52


class Inexpressible(ShapeError):
    """A sum of two constants with different radical parts: not one coefficient."""


class Radical:
    """``q * prod(p ** e)``: an exact positive-or-negative real with at least one radical factor."""

    __slots__ = ("q", "rad", "_hash")

    def __init__(self, q: Fraction, rad: tuple):
        self.q = q
        self.rad = rad  # ((prime, Fraction exponent in (0, 1)), ...) sorted by prime, non-empty
        self._hash = hash(("radical", q, rad))

    # ---------------------------------------------------------------- construction
    @staticmethod
    def make(q, rad: dict):
        """The canonical number ``q * prod(p ** e for p, e in rad.items())`` (a Fraction if no radical
        remains). Integer parts of exponents move into ``q``."""
        q = Fraction(q)
        if q == 0:
            return Fraction(0)
        out = []
        for p in sorted(rad):
            e = Fraction(rad[p])
            whole = math.floor(e)
            if whole:
                q *= Fraction(p) ** whole
                e -= whole
            if e:
                out.append((p, e))
        return Radical(q, tuple(out)) if out else q

    # ---------------------------------------------------------------- arithmetic
    @staticmethod
    def _parts(x):
        if isinstance(x, Radical):
            return x.q, dict(x.rad)
        if isinstance(x, (int, Fraction)) and not isinstance(x, bool):
            return Fraction(x), {}
        return None

    def __mul__(self, other):
        o = Radical._parts(other)
        if o is None:
            return NotImplemented
        rad = dict(self.rad)
        for p, e in o[1].items():
            rad[p] = rad.get(p, 0) + e
        return Radical.make(self.q * o[0], rad)

    __rmul__ = __mul__

    def inverse(self):
        return Radical.make(1 / self.q, {p: -e for p, e in self.rad})

    def __truediv__(self, other):
        o = Radical._parts(other)
        if o is None:
            return NotImplemented
        if o[0] == 0:
            raise ZeroDivisionError("division by zero")
        inv = Radical.make(1 / o[0], {p: -e for p, e in o[1].items()})
        return self * inv

    def __rtruediv__(self, other):
        o = Radical._parts(other)
        if o is None:
            return NotImplemented
        return Radical.make(o[0], o[1]) * self.inverse()

    def __neg__(self):
        return Radical(-self.q, self.rad)

    def __add__(self, other):
        o = Radical._parts(other)
        if o is None:
            return NotImplemented
        if o[0] == 0:
            return self
        if tuple(sorted(o[1].items())) != self.rad:
            raise Inexpressible(f"{self} + {other} is not one monomial")
        return Radical.make(self.q + o[0], dict(self.rad))

    __radd__ = __add__

    def __sub__(self, other):
        o = Radical._parts(other)
        if o is None:
            return NotImplemented
        return self + Radical.make(-o[0], o[1]) if o[1] else self + (-o[0])

    def __rsub__(self, other):
        return (-self) + other

    def __pow__(self, n):
        if not isinstance(n, int) or isinstance(n, bool):
            return NotImplemented
        return Radical.make(self.q ** n, {p: e * n for p, e in self.rad})

    # ---------------------------------------------------------------- comparison
    def __eq__(self, other) -> bool:
        return isinstance(other, Radical) and self.q == other.q and self.rad == other.rad

    def __ne__(self, other) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return self._hash

    def __float__(self) -> float:
        v = float(self.q)
        for p, e in self.rad:
            v *= float(p) ** float(e)
        return v

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"Radical({self})"

    def __str__(self) -> str:
        parts = [] if self.q == 1 else [_frac(self.q)]
        for p, e in self.rad:
            parts.append(f"sqrt({p})" if e == Fraction(1, 2) else f"{p}^({e})")
        return "*".join(parts)


def _frac(q: Fraction) -> str:
    return str(q.numerator) if q.denominator == 1 else f"({q.numerator}/{q.denominator})"


def _factor(n: int) -> dict | None:
    """Prime factorization of 0 < n <= MAX_RADICAND (trial division)."""
    out: dict = {}
    p = 2
    while p * p <= n:
        while n % p == 0:
            out[p] = out.get(p, 0) + 1
            n //= p
        p += 1 if p == 2 else 2
    if n > 1:
        out[n] = out.get(n, 0) + 1
    return out


def root(r: Fraction, k: int):
    """``r ** (1/k)`` for a positive rational r, exactly (a Fraction when it is rational)."""
    rad: dict = {}
    for p, m in _factor(r.numerator).items():
        rad[p] = rad.get(p, 0) + Fraction(m, k)
    for p, m in _factor(r.denominator).items():
        rad[p] = rad.get(p, 0) - Fraction(m, k)
    return Radical.make(1, rad)


def read_float(v: float):
    """The radical a float literal spells (``math.sqrt(8)``, ``8 ** -0.5``, ``(1 / math.sqrt(8)) ** 0.5``),
    or None. Only square and fourth roots of rationals with small numerator and denominator, and
    only within `ULPS` units in the last place."""
    if not isinstance(v, float) or not math.isfinite(v) or v == 0:
        return None
    a = abs(v)
    for k in (2, 4):
        w = a ** k
        if not (1e-12 < w < 1e12):
            continue
        r = Fraction(w).limit_denominator(MAX_RADICAND)
        if r <= 0 or r.numerator > MAX_RADICAND:
            continue
        if abs(w - float(r)) > 4 * k * ULPS * _EPS * float(r):
            continue
        x = root(r, k)
        if not isinstance(x, Radical):
            continue  # rational: not this reading's business
        if abs(float(x) - a) > ULPS * _EPS * a:
            continue
        return x if v > 0 else -x
    return None


def is_exact(c) -> bool:
    return isinstance(c, (Fraction, Radical))
