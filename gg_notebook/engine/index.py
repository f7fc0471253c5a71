"""The hash-consed index of distributed values.

Every node of every rank is interned as a *term* over the global inputs: a rank's input becomes
the clean expression its placement gives (``G[:, 8:16]`` for a shard), a collective becomes the
clean expression of the values it combines (all_reduce -> ``sum(x@r0, x@r1)``), and every other
node is its operator applied to its inputs' terms. Equal terms mean equal values, so replicas on
different ranks collapse into one `DVal` with several locations, and relation pieces found by the
lemmas are matched against the ranks with a single dictionary lookup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from gg_notebook.engine.heap import long_lived_heap
from gg_notebook.ir.graph import Graph, Node
from gg_notebook.relations.expr import Expr, ExprStore, ShapeError
from gg_notebook.relations.linear import LinearForms
from gg_notebook.relations.movement import canonical_write, movement_of
from gg_notebook.relations.sign_blocks import register_cat_pieces, sign_blocks
from gg_notebook.relations.zero_sum import zero_padded_sum


aten = torch.ops.aten


# buckets of values reading the same global inputs (shape, dtype) up to this size are normalized
# whole when a query needs them; larger ones only where a number sits near a value's root
# (32: a data-parallel step at 4 ranks x 2 micro-batches holds ~18 same-shaped gradient values)
SMALL_BUCKET = 32


class IndexError_(Exception):
    """The ranks' collectives could not be scheduled consistently."""


@dataclass(eq=False)
class DVal:
    """A distributed value: one term, held by one or more (rank, node) locations."""

    id: int
    term: Expr
    locations: list[tuple[int, Node]] = field(default_factory=list)

    @property
    def shape(self):
        return self.term.shape

    @property
    def dtype(self):
        return self.term.dtype

    # (number of locations, ranks) and (number of locations, world size, label): a replicated
    # constant can have thousands of locations, and every printed relation names its values
    _ranks_memo: tuple | None = field(default=None, repr=False)
    _label_memo: tuple | None = field(default=None, repr=False)

    @property
    def ranks(self) -> list[int]:
        memo = self._ranks_memo
        if memo is None or memo[0] != len(self.locations):
            memo = self._ranks_memo = (len(self.locations), sorted({r for r, _ in self.locations}))
        return list(memo[1])

    def label(self, world_size: int | None = None) -> str:
        memo = self._label_memo
        if memo is not None and memo[0] == len(self.locations) and memo[1] == world_size:
            return memo[2]
        rank, node = self.locations[0]
        text = f"{node.name}@r{rank}"
        if world_size is not None and world_size > 1 and len(self.ranks) == world_size:
            # the same value on every rank: name it once, say it is replicated
            names = {n.name for _, n in self.locations}
            if len(names) == 1:
                text = f"{node.name}@r*"
        self._label_memo = (len(self.locations), world_size, text)
        return text


class DIndex:
    """Interns all ranks' graphs; maps terms to distributed values."""

    def __init__(self, store: ExprStore, graphs: list[Graph], input_terms: list[list[Expr]]):
        self.store = store
        self.graphs = graphs
        self.world_size = len(graphs)
        self.input_terms = input_terms
        self.dvals: list[DVal] = []
        self.by_term: dict[int, DVal] = {}
        self.node_term: dict[tuple[int, str], Expr] = {}
        self.node_dval: dict[tuple[int, str], DVal] = {}
        # base term id -> [(dim, start, end, dval)]: realized values that are slices of a term,
        # so a relation whose term no rank holds whole can still be rebuilt from its pieces
        self.slices_of: dict[int, list[tuple[int, int, int, DVal]]] = {}
        self._slice_hint: dict[tuple[int, str], tuple[Expr, int, int, int]] = {}
        self._extra_hint: dict[tuple[int, str], tuple[Expr, int, int, int]] = {}  # a second base a value is a slice of
        self._piece_of: dict[tuple[int, str], tuple[Expr, int, int, int]] = {}  # node -> (base, dim, a, b)
        self._alias: dict[tuple[int, str], Expr] = {}  # another term of the same value (sign_blocks)
        self._users: dict[int, list[Expr]] | None = None
        # (shape, dtype, leaf set) -> floating dvals in index order: a value equal to a multiple of
        # another has the same global inputs, so a query only normalizes the values of its bucket
        self._form_buckets: dict[tuple, list[DVal]] | None = None
        self._dval_key: dict[int, tuple | None] = {}  # dval id -> its form key (computed on demand)
        self._dval_key_all: dict[int, tuple | None] = {}  # the same, normalized even without a number near the root
        self._bucket_keys: dict[tuple, dict] = {}  # bucket -> {form key: {first coefficient: dval}}
        self._root_groups: dict[tuple, dict] = {}  # bucket -> {operator: [dvals, keyed]} (`_same_root_hits`)
        self._leaf_masks: dict[int, int] = {}  # term id -> bit set of the global inputs it reads
        self._atom_bits: dict[int, int] = {}
        self.forms = LinearForms(store)
        with long_lived_heap() as keep:  # the index's terms live as long as the run (engine/heap.py)
            self._build(keep)

    # ------------------------------------------------------------------ public
    def realized(self, term: Expr) -> DVal | None:
        return self.by_term.get(term.id)

    def realized_movement(self, term: Expr) -> DVal | None:
        """A value some rank holds whose term is the same data movement as ``term`` (decided on
        index tensors, `gg_notebook.relations.movement`), when no rank holds ``term`` verbatim."""
        d = self.by_term.get(term.id)
        return d if d is not None else movement_of(self).realized(term)

    def realized_up_to_factor(self, term: Expr) -> tuple[DVal, Fraction] | None:
        """A distributed value equal to ``term`` times an exact factor, by the scalar normal form
        (`gg_notebook.relations.linear`): (dval, f) with ``term == f * dval`` over the reals.
        f == 1 when some rank holds exactly that value."""
        if term.dtype is None or not term.dtype.is_floating_point:
            return None
        # A multiple of a value reads the same global inputs. Inputs that cancel out ((x + y) - y)
        # are not looked through: such a value is not found up to a factor (never a wrong match).
        keyed = self._keyed_bucket(term)
        if keyed is None:
            return None
        sum_root = term.op == "accum" or (term.op == "call" and term.attrs.target in (aten.add.Tensor, aten.sub.Tensor))
        if self.forms.worth_indexing(term, depth=3) or sum_root:
            form = self.forms.of(term)
            k = self.forms.key(term)
            if k is None:
                return None
            key, c0 = k
        else:
            # no number near its root: take it as its own base (term == 1 * term, an identity;
            # normalizing its whole history would cost more than it finds)
            form = ((term, Fraction(1)),)
            key, c0 = (term.shape, term.dtype, ((term.id, Fraction(1)),)), Fraction(1)
        hit = keyed.get(key, {})  # first coefficient -> dval, in index order
        if c0 in hit:  # some rank holds exactly this value: prefer it to any multiple
            return hit[c0], Fraction(1)
        if len(form) == 1:  # c * b: a rank may hold the base b itself
            b, c = form[0]
            d = self.by_term.get(b.id)
            if d is not None and tuple(d.shape) == tuple(term.shape) and d.dtype == term.dtype:
                return d, c
        if not hit and len(form) > 1:
            # a sum of several bases: values without a number near their root are normalized too,
            # in a small bucket only (a gradient whose scale sits deep under the loss's backward)
            hit = (self._keyed_bucket(term, full=True) or {}).get(key, {})
            if c0 in hit:
                return hit[c0], Fraction(1)
            if not hit:
                hit = self._same_root_hits(term, key)
                if c0 in hit:
                    return hit[c0], Fraction(1)
        if not hit:
            return None
        c1, d = next(iter(hit.items()))
        return d, c0 / c1

    def _same_root_hits(self, term: Expr, key: tuple) -> dict:
        """{first coefficient: dval} of the values in ``term``'s bucket computed by the same operator
        call as ``term`` (e.g. the same matmul on other operands) whose normal form has ``key``: values
        without a number near their root are not in the bucket's keys (`_key_of`), but a rank value
        with a long history (a weight gradient under a 2-D mesh's forward: embedding, all-reduces,
        masking) may still be a multiple of the query."""
        if term.op != "call":
            return {}
        bkey = (term.shape, term.dtype, self.leaf_mask(term))
        groups = self._root_groups.get(bkey)
        if groups is None:  # the bucket's calls by operator: [values, their form keys (on first use)]
            groups = {}
            for d in self.same_inputs(term):
                if d.term.op == "call":
                    groups.setdefault(d.term.attrs, [[], None])[0].append(d)
            self._root_groups[bkey] = groups
        group = groups.get(term.attrs)
        if group is None:
            return {}
        if group[1] is None:
            table: dict = {}
            for d in group[0]:
                k = self.forms.key(d.term)
                if k is not None:
                    table.setdefault(k[0], {}).setdefault(k[1], d)
            group[1] = table
        return group[1].get(key, {})

    def same_inputs(self, term: Expr) -> list[DVal]:
        """Floating values some rank holds with ``term``'s shape and dtype that read exactly the
        global inputs ``term`` reads (in index order): the only candidates for a value equal to
        ``term`` by a normal form (up to inputs that cancel out, which normal forms do not find)."""
        if term.dtype is None or not term.dtype.is_floating_point:
            return []
        if self._form_buckets is None:
            buckets: dict[tuple, list[DVal]] = {}
            for d in self.dvals:
                t = d.term
                if t.dtype is not None and t.dtype.is_floating_point:
                    buckets.setdefault((t.shape, t.dtype, self.leaf_mask(t)), []).append(d)
            self._form_buckets = buckets
        return self._form_buckets.get((term.shape, term.dtype, self.leaf_mask(term)), [])

    def _keyed_bucket(self, term: Expr, full: bool = False) -> dict | None:
        """The values of `same_inputs` (term) by form key: {key: {first coefficient: dval}} (built
        once per bucket; None if the bucket is empty)."""
        bucket = self.same_inputs(term)
        if not bucket:
            return None
        bkey = (term.shape, term.dtype, self.leaf_mask(term), full)
        keyed = self._bucket_keys.get(bkey)
        if keyed is None:
            keyed = {}
            always = full and len(bucket) <= SMALL_BUCKET
            for d in bucket:
                k = self._key_of(d, always=always)
                if k is not None:
                    keyed.setdefault(k[0], {}).setdefault(k[1], d)
            self._bucket_keys[bkey] = keyed
        return keyed

    def _key_of(self, d: DVal, always: bool = False) -> tuple | None:
        """The form key of a value some rank holds (None: not worth indexing, or too large).
        ``always``: normalize it even without a number near its root (a small bucket: a gradient
        whose scale sits deep inside, under the loss's backward)."""
        memo = self._dval_key if not always else self._dval_key_all
        if d.id in memo:
            return memo[d.id]
        worth = always or self.forms.worth_indexing(d.term)
        k = self.forms.key(d.term) if worth else None
        memo[d.id] = k
        return k

    def leaf_mask(self, term: Expr) -> int:
        """The global inputs ``term`` reads, as a bit set (constants read none). (`fold`'s walk,
        written out: every value's mask is asked when the same-inputs buckets are first built.)"""
        memo = self._leaf_masks
        hit = memo.get(term.id)
        if hit is not None:
            return hit
        bits = self._atom_bits
        stack = [term]
        while stack:
            x = stack[-1]
            if x.id in memo:
                stack.pop()
                continue
            m = 0
            pending = False
            for a in x.args:
                v = memo.get(a.id)
                if v is None:
                    stack.append(a)
                    pending = True
                else:
                    m |= v
            if pending:
                continue
            stack.pop()
            if x.op == "atom" or x.op == "ref":
                m = bits.setdefault(x.id, 1 << len(bits))
            memo[x.id] = m
        return memo[term.id]

    def dval_of(self, rank: int, node: Node) -> DVal:
        return self.node_dval[(rank, node.name)]

    def ref(self, dval: DVal) -> Expr:
        return self.store.ref(dval.id, dval.shape, dval.dtype)

    def dval_by_id(self, i: int) -> DVal:
        return self.dvals[i]

    def users_of(self, term: Expr) -> list[Expr]:
        """Realized terms that take ``term`` as a direct argument (built on first use)."""
        if self._users is None:
            users: dict[int, list[Expr]] = {}
            seen: set[int] = set()
            stack = [d.term for d in self.dvals]
            while stack:
                t = stack.pop()
                if t.id in seen:
                    continue
                seen.add(t.id)
                for a in t.args:
                    users.setdefault(a.id, []).append(t)
                    stack.append(a)
            self._users = users
        return self._users.get(term.id, [])

    def tiling(self, term: Expr) -> list[tuple[int, list[DVal]]]:
        """Ways to rebuild ``term`` by concatenating realized slices of it: [(dim, [dvals])]."""
        pieces = self.slices_of.get(term.id)
        if not pieces:
            if term.op == "const":  # an input-independent value: the ranks' values that tile it
                from gg_notebook.relations.ground import value_tiling

                return value_tiling(self, term)
            return []
        out = []
        for dim in sorted({p[0] for p in pieces}):
            by_start: dict[int, tuple[int, DVal]] = {}
            for d, a, b, dv in pieces:
                if d == dim and b > a and (a not in by_start or b > by_start[a][0]):  # empty pieces tile nothing
                    by_start[a] = (b, dv)
            cur, chosen = 0, []
            while cur in by_start and cur < term.shape[dim]:
                end, dv = by_start[cur]
                chosen.append(dv)
                cur = end
            if cur == term.shape[dim] and len(chosen) > 1:
                out.append((dim, chosen))
        return out

    def finest_tilings(self, term: Expr) -> list[tuple[int, list[DVal]]]:
        """Ways to rebuild ``term`` from the *smallest* realized slices of it along one dim: a rank
        that splits its shard again (micro-batches, chunks) holds finer pieces than the shards."""
        pieces = self.slices_of.get(term.id)
        if not pieces:
            return []
        out = []
        for dim in sorted({p[0] for p in pieces}):
            ends: dict[int, list[tuple[int, DVal]]] = {}
            for d, a, b, dv in pieces:
                want = term.shape[:d] + (b - a,) + term.shape[d + 1:]
                if d == dim and b > a and tuple(dv.shape) == tuple(want):
                    ends.setdefault(a, []).append((b, dv))
            size = term.shape[dim]
            # the tiling with the most pieces (longest path from 0 to size), memoized by start
            best: dict[int, list[DVal] | None] = {size: []}
            for a in sorted(ends, reverse=True):
                choice = None
                for b, dv in ends[a]:
                    rest = best.get(b)
                    if rest is not None and (choice is None or len(rest) + 1 > len(choice)):
                        choice = [dv] + rest
                best[a] = choice
            chosen = best.get(0)
            if chosen and len(chosen) > 1:
                out.append((dim, chosen))
        return out

    # ------------------------------------------------------------------ building
    def _add(self, rank: int, node: Node, term: Expr) -> None:
        self.node_term[(rank, node.name)] = term
        d = self.by_term.get(term.id)
        if d is None:
            d = DVal(len(self.dvals), term)
            self.dvals.append(d)
            self.by_term[term.id] = d
        d.locations.append((rank, node))
        self.node_dval[(rank, node.name)] = d
        alias = self._alias.pop((rank, node.name), None)
        if alias is not None:
            self.by_term.setdefault(alias.id, d)
        if term.op == "call" and len(d.locations) == 1:
            movement_of(self).register_pieces(term, d)
        elif term.op == "cat" and len(d.locations) == 1:
            register_cat_pieces(self, term, d)
        hint = self._slice_hint.pop((rank, node.name), None)
        if hint is None and term.op == "slice":
            hint = (term.args[0],) + tuple(term.attrs)
        if hint is not None:
            self._piece_of[(rank, node.name)] = hint
        if hint is not None and len(d.locations) == 1:
            base, dim, a, b = hint
            self.slices_of.setdefault(base.id, []).append((dim, a, b, d))
        extra = self._extra_hint.pop((rank, node.name), None)
        if extra is not None and len(d.locations) == 1:
            base, dim, a, b = extra
            self.slices_of.setdefault(base.id, []).append((dim, a, b, d))

    def _build(self, keep=lambda: None) -> None:
        # collectives by (communicator, index) -> {rank: first result node}; a collective completes
        # only once every member of its communicator has issued it (reached its node)
        coll: dict[tuple, dict[int, Node]] = {}
        for g in self.graphs:
            for n in g.nodes:
                if n.op == "collective":
                    coll.setdefault(n.attrs.key, {}).setdefault(g.rank, n)
        cursors = self._cursors = [0] * self.world_size
        orders = [_schedule(g.nodes) for g in self.graphs]
        self._pos = [{id(n): i for i, n in enumerate(o)} for o in orders]
        total = sum(len(g.nodes) for g in self.graphs)
        done = 0
        while done < total:
            progressed = False
            for r, order in enumerate(orders):
                while cursors[r] < len(order):
                    n = order[cursors[r]]
                    term = self._term(r, n, coll)
                    if term is None:
                        break  # waiting for another rank to reach this collective
                    self._add(r, n, term)
                    cursors[r] += 1
                    done += 1
                    if not done & 255:
                        keep()
                    progressed = True
            if not progressed:
                stuck = [_waiting_at(r, o[cursors[r]]) for r, o in enumerate(orders) if cursors[r] < len(o)]
                from gg_notebook.capture.errors import CaptureError

                first_rank = next(r for r, o in enumerate(orders) if cursors[r] < len(o))
                raise CaptureError(
                    "the ranks' collectives cannot be matched: " + "; ".join(stuck)
                    + " (a collective completes only when every member of its process group has issued it; a "
                    "receive waits until its peer has sent, except that the transfers of one "
                    "dist.batch_isend_irecv are posted together: if the ranks post a receive and then a send "
                    "with single dist.irecv/dist.isend calls, post them in one dist.batch_isend_irecv)",
                    rank=first_rank, source=orders[first_rank][cursors[first_rank]].source,
                )

    def _term(self, rank: int, n: Node, coll) -> Expr | None:
        S = self.store
        t = lambda x: self.node_term[(rank, x.name)]  # noqa: E731
        op = n.op
        if op == "input":
            return self.input_terms[rank][n.attrs]
        if op == "const":
            return S.const(n.attrs, n.shape, n.dtype)
        if op == "view":
            return S.view(t(n.inputs[0]), n.attrs)
        if op == "permute":
            piece = self._piece_of.get((rank, n.inputs[0].name))
            if piece is not None:  # a permuted slice is a slice of the permuted base (reduce-scatter
                base, d, a, b = piece  # along a dim moved to the front and back: spmd_types)
                perm = tuple(int(i) % len(base.shape) for i in n.attrs)
                self._slice_hint[(rank, n.name)] = (S.permute(base, perm), perm.index(d), a, b)
            return S.permute(t(n.inputs[0]), n.attrs)
        if op == "slice":
            d, a, b = n.attrs
            base = t(n.inputs[0])
            # a piece of base, whatever normal form the store gives it (slice(permute(x)) is kept
            # as permute(slice(x))): the value is still the [a:b] slice of base along d
            self._slice_hint[(rank, n.name)] = (base, d, a, b)
            return S.slice(base, d, a, b)
        if op == "cat":
            return S.cat([t(x) for x in n.inputs], n.attrs)
        if op == "expand":
            return S.expand(t(n.inputs[0]), n.attrs)
        if op == "call":
            # a buffer filled entirely by writes is the data movement of what was written
            term = canonical_write(self, S.call(n.attrs, [t(x) for x in n.inputs], n.shape, n.dtype))
            # a product with a constant of signs is slices and negations (relations/sign_blocks.py);
            # the product's own term stays an alias of the value
            moved = sign_blocks(S, term)
            if moved is not term:
                self._alias[(rank, n.name)] = term
            return moved
        if op == "collective":
            _check_buffer(rank, n)
            term = self._collective_term(rank, n, coll)
            if term is not None and tuple(term.shape) != tuple(n.shape):
                _wrong_buffer(rank, n, tuple(term.shape))
            if term is not None and term.op == "accum":
                # zero buffers each written in disjoint slots, then summed: a gather (relations/zero_sum.py)
                term = zero_padded_sum(self, term)
            return term
        raise IndexError_(f"unknown IR op {op}")

    def _collective_term(self, rank: int, n: Node, coll) -> Expr | None:
        S = self.store
        info = n.attrs
        group = tuple(info.group)
        members = coll.get(info.key, {})
        if info.kind == "send":  # the value leaves this rank; the marker is the sent value itself
            return self.node_term.get((rank, n.inputs[0].name))
        if info.kind == "recv":  # what the source rank sent, once it has sent it
            src = group[0]
            mn = members.get(src)
            if mn is None:
                raise IndexError_(f"rank {src} never sends transfer #{info.index} that rank {rank} receives at "
                                  f"{n.source} ({info.where()})")
            if self._cursors[src] < self._pos[src][id(mn)]:
                return None
            return self.node_term.get((src, mn.inputs[0].name))
        ins: list[Expr] = []
        for m in group:
            mn = members.get(m)
            if mn is None:
                raise IndexError_(
                    f"rank {m} never issues collective #{info.index} on {info.where()} "
                    f"that rank {rank} issues at {n.source}"
                )
            if self._cursors[m] < self._pos[m][id(mn)]:
                return None  # rank m has not issued this collective yet
            key = (m, mn.inputs[0].name)
            if key not in self.node_term:
                return None
            ins.append(self.node_term[key])
        kind = info.kind
        fn = info.reduce_op
        if kind == "all_reduce":
            return _reduce(S, fn, ins, n)
        if kind == "all_gather":
            if info.out_index >= len(ins):
                from gg_notebook.capture.errors import CaptureError

                raise CaptureError(
                    f"rank {rank} calls all_gather at {n.source} with more output tensors than the {len(ins)} "
                    f"ranks of {info.where()}: a real run fails; pass one output tensor per rank of the group.",
                    rank=rank, source=n.source)
            return ins[info.out_index]
        if kind == "all_gather_into_tensor":
            if _is_stacked_gather(n):
                # the stacked form [W, *input] (documented by torch): a stack of the inputs
                return S.cat([S.view(x, (1,) + tuple(x.shape)) for x in ins], 0)
            return S.cat(ins, 0)
        if kind == "reduce_scatter_tensor":
            pos = group.index(rank)
            out = tuple(n.shape)
            if _is_stacked_scatter(n):
                # the stacked input form [W, *output] (documented by torch) is the concatenated
                # form of the same data: merge the stack dim into the first output dim
                W = len(group)
                flat = (W * out[0],) + out[1:] if out else (W,)
                total = _reduce(S, fn, [S.view(x, flat) for x in ins], n)
                size = out[0] if out else 1
                piece = S.slice(total, 0, pos * size, (pos + 1) * size)
                if not out:
                    return S.view(piece, ())
                self._slice_hint[(rank, n.name)] = (total, 0, pos * size, (pos + 1) * size)
                return piece
            scattered = _chunked_along(ins, len(group))
            if scattered is not None:
                # each rank sent cat(x.chunk(W, d), 0) (DTensor's reduce-scatter along dim d): the
                # result is chunk pos of the reduction of the x's along d
                bases, d, c = scattered
                total = _reduce(S, fn, bases, n)
                self._slice_hint[(rank, n.name)] = (total, d, pos * c, (pos + 1) * c)
                return S.slice(total, d, pos * c, (pos + 1) * c)
            total = _reduce(S, fn, ins, n)
            size = n.shape[0]
            self._slice_hint[(rank, n.name)] = (total, 0, pos * size, (pos + 1) * size)
            # the same chunks may also be slices of another view of the inputs' source along a later
            # dim (at batch 1 a sequence chunk of [1, S, H] is a run of rows; a view / transpose
            # spelling): known as such too, decided by data movement (the value's term is unchanged)
            other = _chunked_along(ins, len(group), S, movement_of(self))
            if other is not None:
                bases, d, c = other
                self._extra_hint[(rank, n.name)] = (_reduce(S, fn, bases, n), d, pos * c, (pos + 1) * c)
            return S.slice(total, 0, pos * size, (pos + 1) * size)
        if kind == "broadcast":
            return ins[group.index(info.src)] if info.src in group else ins[0]
        if kind == "all_to_all_single":
            pos = group.index(rank)
            pieces = []
            for j, m in enumerate(group):
                mn = members[m]
                x = ins[j]
                splits = mn.attrs.input_split_sizes
                if not splits:
                    k = x.shape[0] // len(group)
                    splits = [k] * len(group)
                off = sum(splits[:pos])
                pieces.append(S.slice(x, 0, off, off + splits[pos]))
            return S.cat(pieces, 0)
        raise IndexError_(f"unsupported collective {kind} at {n.source}")


def _chunked_along(ins: list[Expr], W: int, S: ExprStore | None = None, mv=None) -> tuple[list[Expr], int, int] | None:
    """``(bases, d, c)`` when every input is ``cat([x[.., k*c:(k+1)*c, ..] for k in range(W)], 0)``
    of its own ``x`` along the same dim ``d > 0`` (``x.shape[d] == W * c``), else None. Decided on
    the spelling first; else (the store keeps a slice of a size-1-dim view as a view of a slice, so
    at batch 1 ``y.chunk(W, 1)`` reads ``y[k*c:(k+1)*c].view(1, c, ..)``) by data movement with
    ``mv``: ``x`` is a view of the pieces' common source, and each piece must be exactly its slice."""
    bases, dim, size = [], None, None
    for t in ins:
        found = _chunks_spelled(t, W)
        if found is None and mv is not None and S is not None:
            found = _chunks_by_movement(S, t, W, mv, dim)
        if found is None:
            return None
        base, d, c = found
        if (dim is not None and d != dim) or (size is not None and c != size):
            return None
        bases.append(base)
        dim, size = d, c
    return (bases, dim, size) if bases else None


def _chunks_spelled(t: Expr, W: int) -> tuple[Expr, int, int] | None:
    if t.op != "cat" or t.attrs != 0 or len(t.args) != W:
        return None
    base, dim, size = None, None, None
    for k, a in enumerate(t.args):
        if a.op != "slice":
            return None
        d, lo, hi = a.attrs
        if d == 0 or (base is not None and a.args[0] is not base) or (dim is not None and d != dim):
            return None
        c = hi - lo
        if (size is not None and c != size) or lo != k * c:
            return None
        base, dim, size = a.args[0], d, c
    if base is None or base.shape[dim] != W * size:
        return None
    return base, dim, size


def _source(e: Expr) -> Expr:
    while e.op in ("view", "slice", "permute"):
        e = e.args[0]
    return e


def _chunks_by_movement(S: ExprStore, t: Expr, W: int, mv, want_dim: int | None) -> tuple[Expr, int, int] | None:
    """``(x, d, c)``: chunk k of ``t`` along dim 0 is exactly ``x[.., k*c:(k+1)*c, ..]`` along ``d > 0``,
    ``x`` a view of ``t``'s source (the value before its views, slices and permutes). Each chunk is
    compared with its slice by data movement (same term, or equal index tensors when small enough)."""
    if not t.shape or t.shape[0] % W or len(t.shape) < 2:
        return None
    s0 = t.shape[0] // W
    chunk = (s0,) + tuple(t.shape[1:])
    try:
        pieces = [t.args[k] if t.op == "cat" and t.attrs == 0 and len(t.args) == W
                  and tuple(t.args[k].shape) == chunk else S.slice(t, 0, k * s0, (k + 1) * s0) for k in range(W)]
    except ShapeError:
        return None
    root = _source(pieces[0])
    if any(_source(p) is not root for p in pieces[1:]):
        return None
    for d in ([want_dim] if want_dim is not None else range(1, len(chunk))):
        c = chunk[d]
        whole = chunk[:d] + (W * c,) + chunk[d + 1:]
        if math.prod(whole) != math.prod(root.shape):
            continue
        try:
            x = S.view(root, whole) if tuple(root.shape) != whole else root
            if all(mv.equal(S.slice(x, d, k * c, (k + 1) * c), p) for k, p in enumerate(pieces)):
                return x, d, c
        except ShapeError:
            continue
    return None


def _expected_shape(n: Node) -> tuple | None:
    """The output shape a real process group demands of collective ``n`` (None: not checked here)."""
    info = n.attrs
    if not n.inputs:
        return None
    src = tuple(n.inputs[0].shape)
    size = len(tuple(info.group))
    if info.kind in ("all_reduce", "broadcast", "all_gather"):
        return src
    if info.kind == "all_gather_into_tensor":
        if _is_stacked_gather(n):
            return (size,) + src
        return (src[0] * size,) + src[1:] if src else (size,)
    if info.kind == "reduce_scatter_tensor" and src:
        if _is_stacked_scatter(n):
            return src[1:]
        return (src[0] // size,) + src[1:] if src[0] % size == 0 else ("not divisible",)
    return None


def _is_stacked_gather(n: Node) -> bool:
    """all_gather_into_tensor into an output of shape [W, *input.shape]: torch documents both a
    concatenation along dim 0 and this stack of the inputs along a new leading dim."""
    if n.attrs.kind != "all_gather_into_tensor" or not n.inputs:
        return False
    src = tuple(n.inputs[0].shape)
    size = len(tuple(n.attrs.group))
    return tuple(n.shape) == (size,) + src and (not src or tuple(n.shape) != (src[0] * size,) + src[1:])


def _is_stacked_scatter(n: Node) -> bool:
    """reduce_scatter_tensor from an input of shape [W, *output.shape] (torch documents both a
    concatenation of the outputs along dim 0 and this stack)."""
    if n.attrs.kind != "reduce_scatter_tensor" or not n.inputs:
        return False
    src = tuple(n.inputs[0].shape)
    size = len(tuple(n.attrs.group))
    if not src or src[0] != size or tuple(n.shape) != src[1:]:
        return False
    return not (src[0] % size == 0 and tuple(n.shape) == (src[0] // size,) + src[1:])


def _check_buffer(rank: int, n: Node) -> None:
    want = _expected_shape(n)
    if want is not None and want != tuple(n.shape):
        _wrong_buffer(rank, n, want)


def _wrong_buffer(rank: int, n: Node, want: tuple) -> None:
    """A collective whose output buffer does not have the shape the collective produces: the fake
    process group used for tracing does not check it, a real one fails ("invalid tensor size")."""
    from gg_notebook.capture.errors import CaptureError

    info = n.attrs
    src = tuple(n.inputs[0].shape) if n.inputs else None
    where = f" at {n.source}" if n.source else ""
    code = f" (`{n.code.strip()}`)" if n.code else ""
    size = len(tuple(info.group))
    if want == ("not divisible",):
        fix = (f"the input's first dim ({src[0]}) must be {size} (the group's size) times the output's "
               f"(or the input a stack of {size} outputs); pad the input or change the split")
    elif info.kind == "all_gather_into_tensor" and src is not None:
        stacked = (size,) + src
        fix = (f"allocate the output with shape {want} (the inputs concatenated along dim 0)"
               + (f" or {stacked} (the inputs stacked along a new dim 0)" if stacked != want else ""))
    else:
        fix = f"allocate the output with shape {want}"
    raise CaptureError(
        f"rank {rank} calls {info.describe()}{where}{code} with an output of shape {tuple(n.shape)} for an "
        f"input of shape {src if src is not None else '?'} on {info.where()}: a real run fails (gloo/NCCL: "
        f"invalid tensor size); {fix}.", rank=rank, source=n.source)


def _schedule(nodes: list[Node]) -> list[Node]:
    """The order in which a rank's nodes are interned: program order, except that the transfers of
    one ``dist.batch_isend_irecv`` (posted together, whatever their order in its list) are taken
    sends first, so a receive listed before a send does not wait for a peer that waits for that send.
    Waits on single ``isend``/``irecv`` calls are not seen in the graph: those keep program order."""
    out: list[Node] = []
    i = 0
    while i < len(nodes):
        n = nodes[i]
        batch = n.attrs.batch if n.op == "collective" and n.attrs.p2p else None
        if batch is None:
            out.append(n)
            i += 1
            continue
        j = i
        while j < len(nodes) and nodes[j].op == "collective" and nodes[j].attrs.p2p and nodes[j].attrs.batch == batch:
            j += 1
        run = nodes[i:j]
        out.extend([x for x in run if x.attrs.kind == "send"] + [x for x in run if x.attrs.kind != "send"])
        i = j
    return out


def _waiting_at(rank: int, n: Node) -> str:
    if n.op == "collective":
        return f"rank {rank} waits in {n.target} at {n.source}, collective #{n.attrs.index} on {n.attrs.where()}"
    return f"rank {rank} at {n.target} ({n.source})"


def _reduce(S: ExprStore, fn: str | None, ins: list[Expr], n: Node) -> Expr:
    if fn in ("sum", "max", "min", "avg"):
        folded = _fold_ground(S, "sum" if fn == "avg" else fn, ins)
        if folded is not None:
            return folded if fn != "avg" else S.scale(folded, Fraction(1, len(ins)))
    if fn in ("sum", "max", "min"):
        return S.accum(fn, ins)
    if fn == "avg":
        return S.scale(S.accum("sum", ins), Fraction(1, len(ins)))
    # product and anything else: an opaque value unique to this collective
    return S.atom(f"{fn}-reduce:{n.name}@r{n.rank}", n.shape, n.dtype)


_FOLD_MAX_NUMEL = 1 << 16
_MANTISSA = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}


def _fold_ground(S: ExprStore, fn: str, ins: list[Expr]) -> Expr | None:
    """A reduction over input-independent values (``n = torch.tensor(float(x.shape[0]));
    dist.all_reduce(n)``: every rank's count), computed by value: a constant term, so that the
    result compares by value (``full(8.0)``) and its fill reads as a number in the scalar normal
    form. Folded only when the result is the same in every summation order (max/min always; a sum
    when every value is an integer and the sum of magnitudes is exactly representable), so the
    constant is the value a real process group computes, bit for bit. None: not folded."""
    if not ins or not all(e.ground for e in ins) or any(e.dtype is None for e in ins):
        return None
    if any(_has_unique(e) for e in ins):
        return None  # uninitialized (empty) or random values: no value to fold
    if len({(tuple(e.shape), e.dtype) for e in ins}) != 1 or math.prod(ins[0].shape) > _FOLD_MAX_NUMEL:
        return None
    dtype = ins[0].dtype
    if dtype.is_complex or dtype == torch.bool:
        return None
    from gg_notebook.relations.expr import evaluate

    def leaf(e):
        raise ValueError("not input-independent")

    try:
        vals = [evaluate(e, leaf).to(dtype) for e in ins]
    except Exception:  # noqa: BLE001 - a constant we cannot evaluate stays an accumulation term
        return None
    if any(v.is_meta for v in vals):
        return None
    if fn == "sum":
        if dtype.is_floating_point:
            wide = [v.double() for v in vals]
            if not all(bool(torch.all(torch.isfinite(w) & (w == w.round()))) for w in wide):
                return None
            bound = sum(w.abs() for w in wide)
            if bound.numel() and float(bound.max()) >= 2.0 ** _MANTISSA.get(dtype, 0):
                return None
        else:
            wide = [v.long() for v in vals]
            total = sum(w.abs() for w in wide)
            if total.numel() and int(total.max()) > torch.iinfo(dtype).max:
                return None
        out = vals[0].clone()
        for v in vals[1:]:
            out = out + v
    else:
        out = vals[0].clone()
        for v in vals[1:]:
            out = torch.maximum(out, v) if fn == "max" else torch.minimum(out, v)
    return _const_term(S, out.to(dtype))


def _has_unique(e: Expr) -> bool:
    """Does ``e`` read a value that is unique to one call (``empty``, a random draw)?"""
    seen, stack = set(), [e]
    while stack:
        x = stack.pop()
        if x.id in seen:
            continue
        seen.add(x.id)
        if getattr(x.attrs, "unique", None) is not None:
            return True
        stack.extend(x.args)
    return False


def _const_term(S: ExprStore, value: torch.Tensor) -> Expr:
    """A constant term holding ``value``: ``full`` when every element is one number (the scalar
    normal form reads its fill), else content-keyed."""
    import hashlib

    from gg_notebook.ir.lower import _Full, _TensorConst
    from gg_notebook.relations.expr import OpSpec

    shape, dtype = tuple(value.shape), value.dtype
    flat = value.reshape(-1)
    if flat.numel() and not torch.isnan(flat).any() and bool(torch.all(flat == flat[0])) \
            and bool(torch.all(torch.signbit(flat) == torch.signbit(flat[0]))):
        v = flat[0].item()
        spec = OpSpec("const", f"full({v})", _Full.of(shape, v, dtype), ((), ()))
    else:
        data = value.contiguous()
        digest = hashlib.sha1(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest() if data.numel() else "empty"
        spec = OpSpec("const", "constant", _TensorConst(digest, shape, dtype, data), ((), ()))
    return S.const(spec, shape, dtype)
