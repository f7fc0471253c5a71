"""Lower a captured torch.fx graph (ATen ops) into the normalized IR of `gg_notebook.ir.graph`.

Why a lowering at all: ATen spells one idea many ways (view/reshape/_unsafe_view/unsqueeze,
transpose/t/permute, split/chunk+getitem, addmm vs add+mm, clone/contiguous/detach). Lemmas are
written once against the normalized vocabulary; everything else becomes a generic ``call`` that
can still be related by exact lookup.
"""

from __future__ import annotations

import hashlib
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from gg_notebook.ir.graph import Graph, Node
from gg_notebook.ir.specs import reduce_spec
from gg_notebook.relations.expr import Lit, OpSpec, Slot, typed, untyped

aten = torch.ops.aten


class LoweringError(Exception):
    """An fx node could not be lowered; names the node, op and source line."""


IDENTITY = {
    "clone", "contiguous", "alias", "detach", "lift_fresh_copy", "lift_fresh", "alias_copy",
    "detach_copy", "_assert_tensor_metadata",
}
VIEWS = {"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten", "view_copy", "_reshape_alias",
         "unflatten", "squeeze_copy", "unsqueeze_copy", "_unsafe_view_copy"}
PERMUTES = {"permute", "transpose", "t", "numpy_T", "permute_copy", "transpose_copy", "t_copy", "swapaxes"}
FACTORIES = {"zeros", "ones", "full", "arange", "scalar_tensor", "zeros_like", "ones_like", "full_like",
             "new_zeros", "new_ones", "new_full", "tensor", "linspace", "eye", "tril_indices", "triu_indices"}
RANDOM = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli", "native_dropout",
          "normal", "uniform", "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided",
          "randperm", "multinomial", "exponential", "geometric"}
# values drawn from an RNG (the rest of RANDOM is uninitialized memory: unique, but not random)
SEEDED = RANDOM - {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}
REDUCE_FNS = {"sum": "sum", "mean": "mean", "amax": "amax", "amin": "amin", "prod": "prod", "logsumexp": "logsumexp"}


@dataclass(frozen=True)
class RandomOp:
    """A random operator found while lowering (see `Problem.random`).

    ``kind`` is "dropout" (a dropout mask: ``bernoulli(1-p) / (1-p)`` multiplying a tensor, or
    ``native_dropout``) or "random" (any other random value); ``identity`` is True when the lowering
    replaced the dropout by the identity (``random="identity"``)."""

    op: str
    kind: str
    rank: int | None
    node: str
    source: str | None
    code: str | None
    identity: bool = False

    @property
    def program(self) -> str:
        return "the sequential program" if self.rank is None else f"rank {self.rank}'s program"


@dataclass(frozen=True)
class _Full:
    """A hashable constant-tensor factory (zeros_like & co become full(shape, value))."""

    shape: tuple
    value: Any  # a Lit, converted to the dtype's Python type (so ones_like == full_like(x, 1.0))
    dtype: Any

    def __call__(self, *args, **kw):
        return torch.full(self.shape, untyped(self.value), dtype=self.dtype)

    def constant_fill(self):
        """The value every element equals (read by the scalar normal form)."""
        return self.value

    @staticmethod
    def of(shape, value, dtype) -> "_Full":
        value = untyped(value)
        if dtype is not None and value is not None:
            if dtype == torch.bool:
                value = bool(value)
            elif dtype.is_complex:
                value = complex(value)
            elif dtype.is_floating_point:
                value = float(value)
            else:
                value = int(value)
        return _Full(tuple(shape), typed(value), dtype)


@dataclass(frozen=True)
class _TensorConst:
    """A tensor constant baked into a graph, keyed by content so equal constants intern equal."""

    digest: str
    shape: tuple
    dtype: Any
    data: Any = None

    def __call__(self, *args, **kw):
        return self.data.clone()

    def __hash__(self):
        return hash((self.digest, self.shape))

    def __eq__(self, other):
        return isinstance(other, _TensorConst) and (self.digest, self.shape, self.dtype) == (other.digest, other.shape, other.dtype)


def _meta_of(node: torch.fx.Node):
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape), val.dtype
    return None, None


def _hashable(v):
    """A template entry: scalars typed (`Lit`: 1, 1.0 and True stay apart), lists as tuples."""
    return typed(v)


INDEX_PUTS = (aten.index_put.default, aten.index_put_.default)


class _Lowerer:
    def __init__(self, gm: torch.fx.GraphModule, rank: int | None, random: str | None = None,
                 input_ranges: dict | None = None):
        from gg_notebook.ir.ranges import IntRanges

        self.ranges = IntRanges(input_ranges)  # integer value ranges (declared input domains)
        self.gm = gm
        self.rank = rank
        self.random = random
        self.random_ops: list[RandomOp] = []
        self.random_fx: list = []  # the fx node of each random_ops entry
        # random="identity": fx nodes of recognised dropout masks (skipped) and the muls and getitems
        # they feed (-> the tensor they multiply)
        self.dropout_skip: set = set()
        self.dropout_same: dict = {}
        self.nodes: list[Node] = []
        self.env: dict[torch.fx.Node, Any] = {}  # fx node -> Node | list[Node] | _Tuple
        self.names: set[str] = set()
        self.cur: torch.fx.Node | None = None

    # --------------------------------------------------------------- helpers
    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            name = f"{base}_{k}"
            k += 1
        self.names.add(name)
        return name

    def emit(self, op, attrs, inputs, shape, dtype, target="", name=None) -> Node:
        fx = self.cur
        frames = tuple(fx.meta.get("gg_frames") or ()) if fx is not None else ()
        code = frames[-1][3] if frames and len(frames[-1]) > 3 else None
        n = Node(
            name=self.fresh(name or (fx.name if fx is not None else op)),
            op=op, attrs=attrs, inputs=tuple(inputs), shape=tuple(shape), dtype=dtype,
            target=target or (str(fx.target) if fx is not None and fx.op == "call_function" else op),
            source=fx.meta.get("gg_source") if fx is not None else None, code=code, frames=frames,
            rank=self.rank, fx_name=fx.name if fx is not None else "",
        )
        if op == "call" and getattr(attrs, "target", None) in INDEX_PUTS and len(inputs) >= 3 and \
                attrs.arg("accumulate", True) is False and tuple(inputs[0].shape) == tuple(shape) and \
                inputs[0].dtype == dtype and all(self.ranges.never_true(m) for m in inputs[1:-1]):
            return inputs[0]  # x[mask] = v with a mask that holds no True: nothing is written
        if op == "call" and all(i.op == "const" for i in n.inputs):
            from gg_notebook.ir.const_fold import fold_uniform

            hit = fold_uniform(n, shape, dtype)  # an elementwise op of uniform constants: a constant
            if hit is not None:
                n = Node(name=n.name, op="const", attrs=hit[0], inputs=(), shape=tuple(shape), dtype=dtype,
                         target="constant", source=n.source, code=n.code, frames=n.frames, rank=n.rank,
                         fx_name=n.fx_name)
                self.nodes.append(n)
                return n
        if op == "call" and dtype is not None and not dtype.is_floating_point and not dtype.is_complex and \
                (getattr(attrs, "kind", None) == "ew" or getattr(attrs, "target", None) in INDEX_PUTS):
            same = self.ranges.same_as_operand(n)
            if same is not None:
                return same  # equal to that operand for every value the input can take
            v = self.ranges.constant(n)
            if v is not None:
                # an integer/boolean function of a ranged input that takes one value on the whole
                # range (``target < 0`` for targets in [0, V)): that value, as a constant
                spec = OpSpec("const", f"full({v})", _Full.of(shape, v, dtype), ((), ()))
                n = Node(name=n.name, op="const", attrs=spec, inputs=(), shape=tuple(shape), dtype=dtype,
                         target="constant", source=n.source, code=n.code, frames=n.frames, rank=n.rank,
                         fx_name=n.fx_name)
        self.nodes.append(n)
        return n

    def spec_for(self, target, args, kwargs, kind="generic", params=(), out=None):
        """OpSpec + tensor inputs for a call; tensor args become Slots."""
        inputs: list[Node] = []
        # x + c spelled add.Scalar (decompositions, F.rms_norm) or add.Tensor (user code): one overload
        target = SCALAR_OVERLOAD_TWIN.get(target, target)

        def conv(a):
            if isinstance(a, torch.fx.Node):
                v = self.env[a]
                if not isinstance(v, Node):
                    raise LoweringError(f"unexpected non-tensor argument {a.name}")
                inputs.append(v)
                return Slot(len(inputs) - 1)
            if isinstance(a, (list, tuple)):
                return tuple(conv(x) for x in a)
            return _hashable(a)

        t_args = tuple(conv(a) for a in args)
        t_kwargs = tuple(sorted((k, conv(v)) for k, v in kwargs.items()))
        if target in DIM_OF_SELF and inputs:
            t_args, t_kwargs = _nonnegative_dims(target, t_args, t_kwargs, len(inputs[0].shape))
        if target in SCALAR_CAST_FIRST and inputs and inputs[0].dtype is not None and inputs[0].dtype.is_floating_point:
            t_args = _floats(t_args)
            t_kwargs = tuple((k, _floats(v)) for k, v in t_kwargs)
        if target in ROUNDS_OTHER_TO_FLOAT32 and inputs and inputs[0].dtype == torch.float32:
            t_args = _other_as_float32(t_args)
        unique = None
        packet = _packet(target)
        if packet in RANDOM or _is_random(target, args, kwargs):
            unique = f"{self.rank}:{self.cur.name if self.cur is not None else id(target)}"
        spec = OpSpec(kind, _name(target), target, (t_args, t_kwargs), tuple(params), out, unique)
        return spec, inputs

    def _live_random_ops(self, live: list[Node]) -> list[RandomOp]:
        """The random operators whose values reach an output or a collective. A dead one (a module's
        random initialization overwritten by ``p.data = w``, an unused ``torch.rand``) changes nothing
        the program computes (a live random operator is refused anyway, whatever the generator's state)."""
        keep = {id(n) for n in live}

        def nodes_of(v) -> list[Node]:
            if isinstance(v, Node):
                return [v]
            if isinstance(v, (tuple, list)):
                return [n for x in v for n in nodes_of(x)]
            return []

        def dead(fx) -> bool:  # only a value lowered to graph nodes, none of them live, is dead
            nodes = nodes_of(self.env.get(fx))
            return bool(nodes) and not any(id(n) in keep for n in nodes)

        return [r for r, fx in zip(self.random_ops, self.random_fx) if not dead(fx)]

    # --------------------------------------------------------------- main loop
    def run(self) -> Graph:
        inputs: list[Node] = []
        outputs: list[Node] = []
        placeholder_index = 0
        dropout = _dropout_masks(self.gm) if self.random is not None else {}
        if self.random == "identity":
            for site, (skip, same) in dropout.items():
                self.dropout_skip |= skip
                self.dropout_same.update(same)
        for fx in self.gm.graph.nodes:
            self.cur = fx
            if fx.op == "call_function" and self.random is not None and _is_random(fx.target, fx.args, fx.kwargs):
                self.random_fx.append(fx)
                frames = fx.meta.get("gg_frames") or ()
                self.random_ops.append(RandomOp(
                    str(fx.target), "dropout" if fx in dropout else "random", self.rank, fx.name,
                    fx.meta.get("gg_source"), frames[-1][3] if frames and len(frames[-1]) > 3 else None,
                    identity=fx in dropout and self.random == "identity"))
            if fx in self.dropout_skip:
                continue
            if fx in self.dropout_same:
                self.env[fx] = self.env[self.dropout_same[fx]]
                continue
            if fx.op == "placeholder":
                shape, dtype = _meta_of(fx)
                idx = fx.meta.get("gg_input_index", placeholder_index)
                placeholder_index += 1
                if shape is None:
                    self.env[fx] = None
                    continue
                n = self.emit("input", idx, (), shape, dtype, target="input",
                              name=fx.meta.get("gg_input_name") or fx.name)
                inputs.append(n)
                self.env[fx] = n
            elif fx.op == "get_attr":
                val = getattr(self.gm, fx.target, None)
                if isinstance(val, torch.Tensor):
                    data = val.detach().cpu()
                    if data.is_meta and data.numel():
                        # no values to compare: a meta constant equals nothing but itself
                        digest = f"meta:{self.rank}:{fx.name}"
                    elif data.numel():
                        digest = hashlib.sha1(data.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                    else:
                        digest = "empty"
                    c = _TensorConst(digest, tuple(data.shape), data.dtype, data)
                    spec = OpSpec("const", "constant", c, ((), ()))
                    self.env[fx] = self.emit("const", spec, (), tuple(data.shape), data.dtype, target="constant")
                else:
                    self.env[fx] = None
            elif fx.op == "output":
                flat = torch.utils._pytree.tree_leaves(fx.args[0])
                for o in flat:
                    if isinstance(o, torch.fx.Node) and isinstance(self.env.get(o), Node):
                        outputs.append(self.env[o])
                    elif o is not None:
                        raise LoweringError(f"output {o!r} is not a tensor")
            elif fx.op == "call_function":
                try:
                    self.env[fx] = self.lower_call(fx)
                except LoweringError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    raise LoweringError(
                        f"could not lower {fx.target} ({fx.name}) at {fx.meta.get('gg_source')}: {exc}"
                    ) from exc
            else:
                raise LoweringError(f"unsupported fx node {fx.op} {fx.target}")
        live = _live(self.nodes, inputs, outputs)
        g = Graph(live, inputs, outputs, rank=self.rank)
        g.random_ops = self._live_random_ops(live)
        # captured for the routing of the example inputs (capture.specialize): the assumption, in words
        g.specialized = list(getattr(self.gm, "meta", {}).get("gg_specialized", ()))
        return g

    # --------------------------------------------------------------- calls
    def lower_call(self, fx: torch.fx.Node):
        target = fx.target
        info = fx.meta.get("gg_collective")
        if info is not None:
            src = fx.args[0]
            shape, dtype = _meta_of(fx)
            return self.emit("collective", info, (self.env[src],), shape, dtype,
                             target=f"{info.kind}({info.reduce_op})" if info.reduce_op else info.kind,
                             name=info.kind)
        if target is operator.getitem:
            base, k = fx.args
            v = self.env[base]
            if isinstance(v, _Tuple):
                return v.get(k, self)
            if isinstance(v, (list, tuple)):
                return v[k]
            raise LoweringError(f"getitem on {base.name}")
        if not isinstance(target, torch._ops.OpOverload):
            # e.g. wait_tensor leftovers or python callables: treat generically if tensor-valued
            packet = getattr(target, "__name__", str(target))
            if packet in ("wait_tensor",):
                return self.env[fx.args[0]]
            return self.generic(fx)
        packet = _packet(target)
        if target.namespace == "profiler":
            return None  # record_function markers (DistributedDataParallel.forward): no value
        args, kwargs = fx.args, fx.kwargs
        shape, dtype = _meta_of(fx)
        env = self.env

        if packet in IDENTITY:
            return env[args[0]]
        neutral = _neutral_operand(target, args, kwargs, env, shape, dtype)
        if neutral is not None:
            return neutral
        if target is aten.pow.Tensor_Scalar and _is_one(args[1] if len(args) > 1 else kwargs.get("exponent")) \
                and env[args[0]].dtype == dtype and tuple(env[args[0]].shape) == tuple(shape):
            return env[args[0]]  # x ** 1 (autograd's derivative of x ** 2) is x, bit for bit
        if target is aten.pow.Tensor_Scalar and _is_two(args[1] if len(args) > 1 else kwargs.get("exponent")) \
                and dtype is not None and dtype.is_floating_point and env[args[0]].dtype == dtype:
            # x ** 2, x.square(), x.pow(2): the kernel computes x * x, bit for bit; one spelling
            spec, inputs = self.spec_for(aten.mul.Tensor, (args[0], args[0]), {}, kind="ew")
            return self.emit("call", spec, inputs, shape, dtype)
        if target in (aten.index.Tensor, aten.index_select.default, aten.index_put.default):
            from gg_notebook.ir.const_index import lower_const_index

            hit = lower_const_index(self, fx, shape, dtype)  # rows moved by a constant index: slices
            if hit is not None:
                return hit
        if target is aten.index.Tensor:
            hit = self.index_as_embedding(fx, shape, dtype)
            if hit is None:
                hit = self.index_as_gather(fx, shape, dtype)
            if hit is not None:
                return hit
        if target is aten.index_put.default:
            hit = self.index_put_as_embedding_backward(fx, shape, dtype)
            if hit is None:
                from gg_notebook.ir.pick_update import index_put_as_pick_update

                hit = index_put_as_pick_update(self, fx, shape, dtype)  # x[arange, ids] -= u
            if hit is not None:
                return hit
        if packet in ASSERTS:
            return None  # checks, not values (a failing check is a crash of the real run, not a value)
        if packet == "copy" and len(args) >= 2 and isinstance(env.get(args[0]), Node) and \
                isinstance(env.get(args[1]), Node):
            # functional copy(dst, src) (a functionalized ``dst.copy_(src)``, an in-place collective
            # written back into its buffer) is src, whatever dst held: only dst's shape and dtype count
            return self.overwrite(fx, env[args[0]], env[args[1]])
        if packet in ("_to_copy", "to", "_to_dtype", "type_as"):
            src = env[args[0]]
            if dtype == src.dtype:
                return src
            if target is aten._to_copy.default and _same_placement_kwargs(fx, kwargs):
                # x.type_as(y) / x.to(y) spell the target's device and layout; when they are the
                # input's own, the call is x.to(dtype) (one spelling, and shapes infer on meta)
                kept = {k: v for k, v in kwargs.items() if k not in ("device", "layout", "pin_memory")}
                spec, inputs = self.spec_for(target, args, kept, kind="ew")
                return self.emit("call", spec, inputs, shape, dtype)
            return self.call(fx, kind="ew")
        if packet in VIEWS and shape is not None:
            return self.view(env[args[0]], tuple(shape), dtype)
        if packet in PERMUTES:
            src = env[args[0]]
            n = len(src.shape)
            if packet == "permute" or packet == "permute_copy":
                perm = tuple(int(p) % n for p in args[1])
            elif packet in ("t", "t_copy", "numpy_T"):
                perm = tuple(reversed(range(n)))
            else:
                d0, d1 = int(args[1]) % n, int(args[2]) % n
                perm = list(range(n))
                perm[d0], perm[d1] = perm[d1], perm[d0]
                perm = tuple(perm)
            return self.emit("permute", perm, (src,), shape, dtype)
        if packet in ("expand", "expand_copy"):
            src = env[args[0]]
            if tuple(src.shape) == tuple(shape):
                return src
            return self.emit("expand", shape, (src,), shape, dtype)
        if packet in ("slice", "slice_copy", "narrow"):
            src = env[args[0]]
            n = len(src.shape)
            if packet == "narrow":
                dim, start, length = int(args[1]) % n, int(args[2]), int(args[3])
                end, step = start + length, 1
            else:
                dim = int(args[1] if len(args) > 1 else kwargs.get("dim", 0)) % n
                start = args[2] if len(args) > 2 else kwargs.get("start")
                end = args[3] if len(args) > 3 else kwargs.get("end")
                step = args[4] if len(args) > 4 else kwargs.get("step", 1)
            size = src.shape[dim]
            start, end, _ = slice(start, end, 1).indices(size)
            end = max(start, end)
            if step == 1:
                if start == 0 and end == size:
                    return src
                return self.emit("slice", (dim, start, end), (src,), shape, dtype)
            return self.strided(fx, src, dim, start, int(step), tuple(shape), dtype)
        if packet in ("select", "select_copy"):
            src = env[args[0]]
            n = len(src.shape)
            dim = int(args[1]) % n
            i = int(args[2]) % src.shape[dim]
            sshape = list(src.shape)
            sshape[dim] = 1
            s = self.emit("slice", (dim, i, i + 1), (src,), sshape, dtype, name=fx.name + "_slice")
            return self.emit("view", shape, (s,), shape, dtype)
        if packet in ("cat", "concat", "concatenate"):
            tensors = [env[t] for t in args[0]]
            dim = int(args[1] if len(args) > 1 else kwargs.get("dim", 0))
            # torch.cat skips empty pieces; so do we (a lone piece is kept whatever its size)
            tensors = [t for t in tensors if t is not None and math.prod(t.shape) > 0] or tensors[:1]
            dim = dim % len(shape)
            if len(tensors) == 1:
                return tensors[0]
            return self.emit("cat", dim, tensors, shape, dtype)
        if packet == "stack":
            tensors = [env[t] for t in args[0]]
            dim = int(args[1] if len(args) > 1 else kwargs.get("dim", 0)) % len(shape)
            views = []
            for t in tensors:
                vshape = list(t.shape)
                vshape.insert(dim, 1)
                views.append(self.emit("view", tuple(vshape), (t,), vshape, dtype, name=fx.name + "_unsq"))
            return self.emit("cat", dim, views, shape, dtype)
        if packet in ("split", "split_with_sizes", "chunk", "unbind", "tensor_split", "unsafe_split",
                      "split_with_sizes_copy", "unbind_copy", "split_copy"):
            return self.split(fx, packet)
        if packet in ("addmm", "baddbmm", "addbmm"):
            return self.addmm(fx, packet)
        if packet in ("view_as_complex", "view_as_real", "view_as_complex_copy", "view_as_real_copy"):
            # a reinterpretation of the last dim (pairs <-> complex numbers): lemmas in
            # gg_notebook.lemmas.complex_views move it through concatenations of the other dims
            return self.call(fx, kind="complex_view")
        if packet == "bmm" and shape is not None and shape[0] == 1:
            return self.single_bmm(fx, shape, dtype)
        if packet in ("mm", "bmm"):
            spec_str = "ik,kj->ij" if packet == "mm" else "bik,bkj->bij"
            return self.call(fx, kind="matmul", params=(("einsum", spec_str),))
        if packet in ("sum", "mean", "amax", "amin", "logsumexp", "prod") and shape is not None:
            return self.reduce(fx, packet)
        if packet in ("max", "min") and len(args) >= 2 and isinstance(args[1], int):
            src = self.env[args[0]]
            dims = (int(args[1]) % len(src.shape),)
            keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
            # the values output is amax/amin; the indices output stays a generic call
            return _Tuple(self, fx, kind="generic",
                          spec_by_out={0: (reduce_spec("a" + packet, dims, keepdim), (src,))})
        if target in ROWWISE:
            # each 1-D slice along ``dim`` on its own (top-k, sort, cumulative sums): the other dims
            # map position-wise (lemmas.dims, kind "rowwise")
            src = env[args[0]]
            name, default = ROWWISE[target]
            names = [a.name for a in target._schema.arguments]
            i = names.index(name)
            dim = args[i] if len(args) > i else kwargs.get(name, default)
            if isinstance(src, Node) and isinstance(dim, int) and len(src.shape) > 0:
                params = (("dim", int(dim) % len(src.shape)),)
                if isinstance(fx.meta.get("val"), (tuple, list)):
                    return _Tuple(self, fx, kind="rowwise", shared=params)
                return self.call(fx, kind="rowwise", params=params)
        if packet in ("_softmax", "_log_softmax", "softmax", "log_softmax"):
            src = env[args[0]]
            dim = int(args[1]) % len(src.shape)
            fn = "log_softmax" if "log" in packet else "softmax"
            return self.call(fx, kind="softmax", params=(("dim", dim), ("fn", fn)))
        if packet in ("_softmax_backward_data", "_log_softmax_backward_data"):
            src = env[args[0]]
            dim = int(args[2]) % len(src.shape)
            fn = "log_softmax" if "log" in packet else "softmax"
            return self.call(fx, kind="softmax_backward", params=(("dim", dim), ("fn", fn)))
        if packet == "native_layer_norm":
            n_norm = len(args[1])
            return _Tuple(self, fx, kind="layer_norm", shared=(("n", n_norm),))
        if packet == "native_layer_norm_backward":
            n_norm = len(args[2])
            return _Tuple(self, fx, kind="layer_norm_backward", shared=(("n", n_norm),))
        if packet == "nll_loss_forward":
            return _Tuple(self, fx, kind="nll_loss")
        if packet == "nll_loss_backward":
            return self.call(fx, kind="nll_loss_backward")
        if packet == "embedding":
            return self.call(fx, kind="embedding")
        if packet == "embedding_dense_backward":
            return self.call(fx, kind="embedding_backward")
        if packet in FACTORIES:
            if shape is None:
                return self.generic(fx)
            if packet in ("zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full", "zeros", "ones", "full"):
                value = {"zeros_like": 0, "ones_like": 1, "new_zeros": 0, "new_ones": 1, "zeros": 0, "ones": 1}.get(packet)
                if value is None:
                    value = args[1] if packet in ("full_like", "full", "new_full") and len(args) > 1 else kwargs.get("fill_value")
                    if packet == "new_full":
                        value = args[2] if len(args) > 2 else kwargs.get("fill_value")
                spec = OpSpec("const", f"full({value})", _Full.of(shape, value, dtype), ((), ()))
                return self.emit("const", spec, (), shape, dtype)
            spec, inputs = self.spec_for(target, args, kwargs, kind="const")
            if inputs:
                return self.generic(fx)
            return self.emit("const", spec, (), shape, dtype)
        if isinstance(fx.meta.get("val"), (tuple, list)):
            return _Tuple(self, fx, kind=_kind_of(target))
        return self.call(fx, kind=_kind_of(target))

    def call(self, fx, kind="generic", params=(), out=None) -> Node:
        spec, inputs = self.spec_for(fx.target, fx.args, fx.kwargs, kind=kind, params=params, out=out)
        shape, dtype = _meta_of(fx)
        if shape is None:
            raise LoweringError(f"{fx.target} ({fx.name}) does not produce a tensor")
        return self.emit("call", spec, inputs, shape, dtype)

    def generic(self, fx):
        if isinstance(fx.meta.get("val"), (tuple, list)):
            return _Tuple(self, fx, kind="generic")
        return self.call(fx)

    def reduce(self, fx, packet) -> Node:
        src = self.env[fx.args[0]]
        n = len(src.shape)
        args, kwargs = fx.args, fx.kwargs
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = tuple(range(n))
        elif isinstance(dims, int):
            dims = (dims,)
        dims = tuple(sorted(int(d) % max(n, 1) for d in dims))
        keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
        spec = reduce_spec(REDUCE_FNS[packet], dims, keepdim, kwargs.get("dtype"))
        if spec is None:
            params = (("fn", REDUCE_FNS[packet]), ("dims", dims), ("keepdim", keepdim))
            return self.call(fx, kind="reduce", params=params)
        shape, dtype = _meta_of(fx)
        return self.emit("call", spec, (src,), shape, dtype)

    def single_bmm(self, fx, shape, dtype) -> Node:
        """A batch-1 ``bmm`` (how ``torch.einsum`` spells a plain matrix product) is ``mm`` of the two
        matrices, viewed back: one form for ``einsum('bsi,oi->bso')``, ``x @ w.t()`` and ``F.linear``."""
        a, b = self.env[fx.args[0]], self.env[fx.args[1]]
        if not isinstance(a, Node) or not isinstance(b, Node) or a.dtype != b.dtype:
            return self.call(fx, kind="matmul", params=(("einsum", "bik,bkj->bij"),))
        a2 = self.view(a, tuple(a.shape[1:]), a.dtype)
        b2 = self.view(b, tuple(b.shape[1:]), b.dtype)
        target = aten.mm.default
        spec = OpSpec("matmul", _name(target), target, ((Slot(0), Slot(1)), ()), (("einsum", "ik,kj->ij"),))
        prod = self.emit("call", spec, (a2, b2), tuple(shape[1:]), dtype, target=_name(target),
                         name=fx.name + "_mm")
        return self.view(prod, tuple(shape), dtype)

    def _row_ids(self, weight_fx, indices, rows: int):
        """The id tensor of ``weight[ids]`` (one index tensor, on dim 0) if every id is provably in
        ``[0, rows)`` (`gg_notebook.ir.ranges`), else None."""
        if not isinstance(indices, (list, tuple)) or len(indices) != 1 or not isinstance(indices[0], torch.fx.Node):
            return None
        ids = self.env.get(indices[0])
        if not isinstance(ids, Node) or ids.dtype not in (torch.int64, torch.int32):
            return None
        return indices[0] if self.ranges.within(ids, 0, rows - 1) else None

    def index_as_embedding(self, fx, shape, dtype) -> Node | None:
        """``weight[ids]`` is ``F.embedding(ids, weight)`` when every id is in ``[0, V)`` (a negative
        id wraps in one and fails in the other): clamped ids, declared domains, aranges."""
        weight_fx, indices = fx.args[0], fx.args[1]
        weight = self.env.get(weight_fx)
        if not isinstance(weight, Node) or len(weight.shape) != 2:
            return None
        ids_fx = self._row_ids(weight_fx, indices, weight.shape[0])
        if ids_fx is None:
            return None
        spec, inputs = self.spec_for(aten.embedding.default, (weight_fx, ids_fx), {}, kind="embedding")
        return self.emit("call", spec, inputs, shape, dtype)

    def index_as_gather(self, fx, shape, dtype) -> Node | None:
        """``x[arange(n), ids]`` (one pick per row of a matrix, as written-out cross-entropies pick
        the target's logit) is ``x.gather(1, ids.unsqueeze(1)).view(n)`` when every id is in
        ``[0, C)`` (a negative id wraps in one and fails in the other)."""
        x_fx, indices = fx.args[0], fx.args[1]
        x = self.env.get(x_fx)
        if not isinstance(x, Node) or len(x.shape) != 2 or not isinstance(indices, (list, tuple)) or len(indices) != 2:
            return None
        if not all(isinstance(i, torch.fx.Node) for i in indices):
            return None
        rows, cols = self.env.get(indices[0]), self.env.get(indices[1])
        n, C = x.shape
        if not isinstance(rows, Node) or not isinstance(cols, Node) or tuple(cols.shape) != (n,) \
                or cols.dtype not in (torch.int64, torch.int32) or not _is_arange(rows, n):
            return None
        if not self.ranges.within(cols, 0, C - 1):
            return None
        idx = self.view(cols, (n, 1), cols.dtype)
        target = aten.gather.default
        spec = OpSpec("generic", _name(target), target, ((Slot(0), 1, Slot(1)), ()))
        picked = self.emit("call", spec, (x, idx), (n, 1), dtype, target=_name(target), name=fx.name + "_gather")
        return self.view(picked, tuple(shape), dtype)

    def index_put_as_embedding_backward(self, fx, shape, dtype) -> Node | None:
        """``zeros(V, H).index_put_([ids], g, accumulate=True)`` (autograd's gradient of
        ``weight[ids]``) is ``embedding_dense_backward(g, ids, V)`` when every id is in ``[0, V)``."""
        args = list(fx.args) + [fx.kwargs.get("accumulate", False)] * (4 - len(fx.args))
        base_fx, indices, values_fx, accumulate = args[:4]
        base = self.env.get(base_fx)
        values = self.env.get(values_fx) if isinstance(values_fx, torch.fx.Node) else None
        if accumulate is not True or not isinstance(base, Node) or not isinstance(values, Node):
            return None
        fill = getattr(base.attrs.target, "constant_fill", None) if base.op == "const" else None
        if fill is None or untyped(fill()) != 0 or len(base.shape) != 2 or values.dtype != dtype:
            return None
        ids_fx = self._row_ids(base_fx, indices, base.shape[0])
        if ids_fx is None:
            return None
        ids = self.env[ids_fx]
        if tuple(values.shape) != tuple(ids.shape) + (base.shape[1],) or tuple(shape) != tuple(base.shape):
            return None
        spec, inputs = self.spec_for(aten.embedding_dense_backward.default,
                                     (values_fx, ids_fx, base.shape[0], -1, False), {}, kind="embedding_backward")
        return self.emit("call", spec, inputs, shape, dtype)

    def strided(self, fx, src: Node, dim: int, start: int, step: int, shape: tuple, dtype) -> Node:
        """``x[.., start:end:step]`` as clean data movement when ``step`` divides the dim's size:
        view the dim as (size/step, step), keep phase ``start % step`` and the rows from
        ``start // step`` (element j is x[start + j*step] = v[start//step + j, start % step]).
        Interleaved layouts (``x[..., ::2]``, ``x[..., 1::2]``) then relate like any slice."""
        size = src.shape[dim]
        n = shape[dim]
        if step <= 1 or size % step or n == 0:
            return self.call(fx)
        lead, tail = tuple(src.shape[:dim]), tuple(src.shape[dim + 1:])
        v = self.emit("view", lead + (size // step, step) + tail, (src,), lead + (size // step, step) + tail, dtype,
                      name=fx.name + "_rows")
        phase, row0 = start % step, start // step
        p = self.emit("slice", (dim + 1, phase, phase + 1), (v,), lead + (size // step, 1) + tail, dtype,
                      name=fx.name + "_phase")
        if row0 != 0 or n != size // step:
            p = self.emit("slice", (dim, row0, row0 + n), (p,), lead + (n, 1) + tail, dtype, name=fx.name + "_span")
        return self.emit("view", shape, (p,), shape, dtype)

    def view(self, src: Node, shape: tuple, dtype, depth: int = 0) -> Node:
        """``src`` viewed as ``shape``. A view that only regroups the leading dims of an elementwise
        op whose other operands broadcast over those dims is sunk below it (``view(a + b, s)`` ->
        ``view(a, s) + b``): ``F.linear`` (2-D addmm, then a view to 3-D) and ``x @ w.t() + b`` (3-D
        matmul, then the bias) get one form. Values are unchanged, element for element."""
        if depth < 4 and src.op == "call" and src.attrs.kind == "ew" and src.attrs.unique is None:
            full = [i for i in src.inputs if tuple(i.shape) == tuple(src.shape)]
            plan = _sunk_shapes(tuple(src.shape), tuple(shape), src.inputs) if full else None
            if plan is not None:
                new_inputs = []
                for i, s_new in zip(src.inputs, plan):
                    if tuple(i.shape) == tuple(src.shape):
                        new_inputs.append(self.view(i, shape, i.dtype, depth + 1))
                    elif s_new is not None and tuple(s_new) != tuple(i.shape):
                        new_inputs.append(self.emit("view", s_new, (i,), s_new, i.dtype, name=f"{i.name}_bview"))
                    else:
                        new_inputs.append(i)
                return self.emit("call", src.attrs, new_inputs, shape, dtype, target=src.target)
        return self.emit("view", shape, (src,), shape, dtype)

    def overwrite(self, fx, dst: Node, src: Node) -> Node:
        """``copy(dst, src)``: the value is ``src``, broadcast to dst's shape and cast to its dtype;
        dst's own contents never matter (an uninitialized buffer, ``torch.empty(..).copy_(y)``, or a
        buffer that a functionalized in-place write replaces)."""
        shape, dtype = _meta_of(fx)
        v = src
        if tuple(v.shape) != tuple(shape):
            v = self.emit("expand", tuple(shape), (v,), shape, v.dtype, name=fx.name + "_expand")
        if v.dtype != dtype:
            target = aten._to_copy.default
            spec = OpSpec("ew", _name(target), target, ((Slot(0),), (("dtype", dtype),)))
            v = self.emit("call", spec, (v,), shape, dtype, target=_name(target))
        return v

    def addmm(self, fx, packet) -> Node:
        """addmm(bias, a, b, beta, alpha) -> add(beta*bias, alpha*mm(a, b)); lemmas see mm and add.
        With ``beta=0`` the bias is ignored entirely (even NaN or uninitialized): just the product."""
        args, kwargs = fx.args, fx.kwargs
        beta = kwargs.get("beta", 1)
        alpha = kwargs.get("alpha", 1)
        if (beta not in (0, 1) or isinstance(beta, bool)) or alpha != 1 or isinstance(alpha, bool) or packet == "addbmm":
            return self.call(fx)
        bias, a, b = (self.env[x] for x in args[:3])
        shape, dtype = _meta_of(fx)
        mm_target = aten.mm.default if packet == "addmm" else aten.bmm.default
        einsum = "ik,kj->ij" if packet == "addmm" else "bik,bkj->bij"
        mm_spec = OpSpec("matmul", _name(mm_target), mm_target, ((Slot(0), Slot(1)), ()), (("einsum", einsum),))
        if beta == 0:
            return self.emit("call", mm_spec, (a, b), shape, dtype, target=_name(mm_target))
        mm = self.emit("call", mm_spec, (a, b), shape, dtype, target=_name(mm_target), name=fx.name + "_mm")
        add_target = aten.add.Tensor
        add_spec = OpSpec("ew", _name(add_target), add_target, ((Slot(0), Slot(1)), ()))
        return self.emit("call", add_spec, (mm, bias), shape, dtype, target=_name(add_target))

    def split(self, fx, packet):
        src = self.env[fx.args[0]]
        args, kwargs = fx.args, fx.kwargs
        n = len(src.shape)
        vals = fx.meta.get("val")
        if packet == "unbind" or packet == "unbind_copy":
            dim = int(args[1] if len(args) > 1 else kwargs.get("dim", 0)) % n
            sizes = [1] * src.shape[dim]
            squeeze = True
        else:
            dim = int(args[2] if len(args) > 2 else kwargs.get("dim", 0)) % n
            sizes = [int(v.shape[dim]) for v in vals]
            squeeze = False
        pieces = []
        off = 0
        for k, sz in enumerate(sizes):
            sshape = list(src.shape)
            sshape[dim] = sz
            if off == 0 and sz == src.shape[dim]:
                s = src
            else:
                s = self.emit("slice", (dim, off, off + sz), (src,), sshape, src.dtype, name=f"{fx.name}_{k}")
            if squeeze:
                vshape = tuple(sshape[:dim] + sshape[dim + 1:])
                s = self.emit("view", vshape, (s,), vshape, src.dtype, name=f"{fx.name}_{k}v")
            pieces.append(s)
            off += sz
        return pieces


class _Tuple:
    """A tuple-returning op; each getitem becomes its own IR node with ``OpSpec.out`` set."""

    def __init__(self, low: _Lowerer, fx, kind="generic", shared=(), params_by_out=None, spec_by_out=None):
        self.low, self.fx, self.kind, self.shared = low, fx, kind, shared
        self.params_by_out = params_by_out or {}
        self.spec_by_out = spec_by_out or {}
        self.cache: dict[int, Node] = {}

    def get(self, k: int, low: _Lowerer) -> Node:
        if k not in self.cache:
            fx = self.fx
            val = fx.meta["val"][k]
            if not isinstance(val, torch.Tensor):
                raise LoweringError(f"output {k} of {fx.target} is not a tensor")
            params = self.params_by_out.get(k, self.shared)
            kind = self.kind if k in self.params_by_out or not self.params_by_out else "generic"
            if self.params_by_out and not params:
                kind = "generic"
            if k in self.spec_by_out:
                spec, inputs = self.spec_by_out[k]
            else:
                spec, inputs = low.spec_for(fx.target, fx.args, fx.kwargs, kind=kind, params=params, out=k)
            saved = low.cur
            low.cur = fx
            node = low.emit("call", spec, inputs, tuple(int(s) for s in val.shape), val.dtype,
                            name=f"{fx.name}_{k}" if k else fx.name)
            low.cur = saved
            self.cache[k] = node
        return self.cache[k]


def _is_random(target, args=(), kwargs=None) -> bool:
    """Does this call draw random numbers? The random packets do; an operator tagged
    ``nondeterministic_seeded`` does unless it has a ``dropout_p`` argument equal to 0 (attention
    kernels such as ``_scaled_dot_product_flash_attention_for_cpu`` are tagged because they *can*
    drop out; with ``dropout_p=0.0`` they are deterministic)."""
    if _packet(target) in SEEDED:
        return True
    if torch.Tag.nondeterministic_seeded not in getattr(target, "tags", ()):
        return False
    p = _schema_arg(target, args, kwargs or {}, "dropout_p")
    if p is _NO_ARG:
        return True
    return not (isinstance(p, (int, float)) and not isinstance(p, bool) and p == 0)


_NO_ARG = object()


def _same_placement_kwargs(fx: torch.fx.Node, kwargs) -> bool:
    """Do ``_to_copy``'s device / layout / pin_memory keywords leave the input where it is?"""
    src = fx.args[0].meta.get("val") if fx.args and isinstance(fx.args[0], torch.fx.Node) else None
    if not isinstance(src, torch.Tensor):
        return False
    device = kwargs.get("device")
    if device is not None and torch.device(device) != src.device:
        return False
    layout = kwargs.get("layout")
    if layout is not None and layout != src.layout:
        return False
    return kwargs.get("pin_memory") in (None, False)


def _schema_arg(target, args, kwargs, name: str):
    """The value ``name`` is bound to in a call of OpOverload ``target`` (its default if not passed);
    `_NO_ARG` if the schema has no such argument (or no default and it is not passed)."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return _NO_ARG
    for i, a in enumerate(schema.arguments):
        if a.name != name:
            continue
        if not a.kwarg_only and i < len(args):
            return args[i]
        if name in kwargs:
            return kwargs[name]
        return a.default_value if a.has_default_value() else _NO_ARG
    return _NO_ARG


def _users_are(node: torch.fx.Node, ok) -> bool:
    return bool(node.users) and all(ok(u) for u in node.users)


def _dropout_masks(gm: torch.fx.GraphModule) -> dict:
    """Dropout as make_fx spells it, recognised strictly (anything else stays a raw random op):

    * ``m = bernoulli.p(t, q)``, used only by ``d = div.Scalar(m, q)``, where ``t`` (``empty_like`` &
      co., only shape matters) feeds nothing else and every user of ``d`` is ``mul.Tensor(x, d)`` (or
      ``(d, x)``) with the shape of ``x`` - ``F.dropout``, ``nn.Dropout``, ``dropout2d``, and the same
      mask reused by the backward's mul;
    * ``native_dropout(x, p, train)``: output 0 used as a tensor, output 1 (the mask) used only by
      ``native_dropout_backward(g, mask, scale)``.

    Returns {random fx node: (fx nodes to skip, {fx node: the fx node it equals})}: with the mask
    taken as all ones, i.e. evaluation semantics, each mul is its tensor operand."""
    out: dict = {}
    getitem = operator.getitem
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is aten.bernoulli.p and len(n.args) >= 2 and isinstance(n.args[0], torch.fx.Node):
            src, q = n.args[0], n.args[1]
            if len(n.users) != 1 or len(src.users) != 1 or _packet(src.target) not in (
                    "empty_like", "empty", "new_empty", "empty_strided", "new_empty_strided"):
                continue
            (d,) = n.users
            if d.target is not aten.div.Scalar or d.args[0] is not n or d.args[1] != q or not isinstance(q, (int, float)):
                continue

            def is_mask_mul(u, d=d):
                if u.target is not aten.mul.Tensor or len(u.args) != 2 or d not in u.args or u.args[0] is u.args[1]:
                    return False
                x = u.args[1] if u.args[0] is d else u.args[0]
                return isinstance(x, torch.fx.Node) and _meta_of(x)[0] is not None and _meta_of(x) == _meta_of(u)

            if not _users_are(d, is_mask_mul):
                continue
            same = {u: (u.args[1] if u.args[0] is d else u.args[0]) for u in d.users}
            out[n] = ({src, n, d}, same)
        elif n.target is aten.native_dropout.default and isinstance(n.args[0], torch.fx.Node):
            outs = {u.args[1]: u for u in n.users if u.target is getitem}
            if len(outs) != len(n.users) or 0 not in outs:
                continue
            mask = outs.get(1)
            if mask is not None and not _users_are(mask, lambda u, m=mask: u.target is aten.native_dropout_backward.default
                                                    and u.args[1] is m and u.args[0] is not m):
                continue
            same = {outs[0]: n.args[0]}
            if mask is not None:
                same.update({u: u.args[0] for u in mask.users})
            out[n] = ({n} | ({mask} if mask is not None else set()), same)
    return out


# `.Scalar` overloads that compute exactly what their `.Tensor` twin computes with a Python number
# (same schema argument names, same type promotion of a wrapped number): lowered to the twin.
SCALAR_OVERLOAD_TWIN = {
    aten.add.Scalar: aten.add.Tensor, aten.sub.Scalar: aten.sub.Tensor, aten.mul.Scalar: aten.mul.Tensor,
    aten.div.Scalar: aten.div.Tensor,
}

# Overloads that convert a Python-number operand to the floating-point tensor's dtype before
# computing: on a float tensor, ``x * 2`` and ``x * 2.0`` are the same call (an int below 2**53 and
# its float convert to the same value). Not pow & co. (an int exponent may take another kernel
# path), not integer tensors (``ids == 2.0`` compares in float).
SCALAR_CAST_FIRST = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar, aten.sub.Scalar,
    aten.mul.Scalar, aten.div.Scalar, aten.rsub.Scalar, aten.rsub.Tensor, aten.masked_fill.Scalar,
    aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.fill.Scalar,
    aten.eq.Scalar, aten.ne.Scalar, aten.lt.Scalar, aten.le.Scalar, aten.gt.Scalar, aten.ge.Scalar,
    aten.where.ScalarOther, aten.where.ScalarSelf,
}


# On a float32 tensor, ``x + c`` (and -, *, /) with a Python float c computes with c rounded to
# float32 (the CPU kernels read a scalar operand as their float32 compute type; a wrapped-number
# tensor is cast to the common dtype float32): so ``ms + 1e-6`` and F.rms_norm's ``add_(ms,
# float32(1e-6))`` are one call. Not float16/bfloat16 (their compute type is float32, not theirs).
ROUNDS_OTHER_TO_FLOAT32 = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor}


def _other_as_float32(t_args: tuple) -> tuple:
    """``(self, other)`` with a float ``other`` (a Python number) rounded to float32."""
    if len(t_args) != 2 or not isinstance(t_args[0], Slot) or not isinstance(t_args[1], Lit) \
            or type(t_args[1].value) is not float:
        return t_args
    c = t_args[1].value
    r = float(torch.tensor(c, dtype=torch.float64).to(torch.float32).item())
    return t_args if r == c or math.isnan(c) else (t_args[0], Lit(r))


# Overloads whose ``dim`` arguments index the dims of their first tensor argument (so ``dim=-1``
# and ``dim=ndim-1`` are one call). Not ops whose dims index the *output* (diag_embed, unsqueeze).
DIM_OF_SELF = {
    aten._softmax.default, aten._log_softmax.default, aten._softmax_backward_data.default,
    aten._log_softmax_backward_data.default, aten.gather.default, aten.index_select.default,
    aten.cumsum.default, aten.cumprod.default, aten.argmax.default, aten.argmin.default,
    aten.sort.default, aten.sort.stable, aten.topk.default, aten.flip.default, aten.roll.default,
    aten.scatter.src, aten.scatter.value, aten.scatter_add.default, aten.index_add.default,
    aten.index_copy.default, aten.index_fill.int_Scalar, aten.slice_scatter.default,
    aten.select_scatter.default, aten.glu.default, aten.var.correction, aten.std.correction,
    aten.any.dim, aten.all.dim, aten.prod.dim_int, aten.logcumsumexp.default, aten.cummax.default,
    aten.cummin.default, aten.repeat_interleave.self_int,
}
_DIM_ARGS = ("dim", "dims")

# Operators that act on each 1-D slice along one dim independently: {overload: (dim argument, default)}
ROWWISE = {
    aten.topk.default: ("dim", -1), aten.sort.default: ("dim", -1), aten.sort.stable: ("dim", -1),
    aten.cumsum.default: ("dim", None), aten.cumprod.default: ("dim", None),
}


def _nonnegative_dims(target, t_args: tuple, t_kwargs: tuple, ndim: int):
    """``dim``/``dims`` arguments of ``target`` taken modulo the first tensor's rank."""
    if ndim == 0:
        return t_args, t_kwargs
    names = [a.name for a in target._schema.arguments]

    def fix(v):
        if isinstance(v, Lit) and type(v.value) is int and -ndim <= v.value < ndim:
            return Lit(v.value % ndim)
        if isinstance(v, tuple):
            return tuple(fix(x) for x in v)
        return v

    t_args = tuple(fix(v) if i < len(names) and names[i] in _DIM_ARGS else v for i, v in enumerate(t_args))
    t_kwargs = tuple((k, fix(v) if k in _DIM_ARGS else v) for k, v in t_kwargs)
    return t_args, t_kwargs


ASSERTS = {"_assert_async", "_assert_scalar", "_functional_assert_async", "_assert_tensor_metadata",
           "_functional_assert_scalar"}
UNINITIALIZED = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}


# x + 0, x - 0, x * 1, x / 1 (a Python number): the same value as x when the result keeps x's
# dtype and shape. (Not 0 * x: it is not x, and NaN * 0 is NaN.)
_NEUTRAL = {
    aten.add.Tensor: 0, aten.sub.Tensor: 0, aten.add.Scalar: 0, aten.sub.Scalar: 0,
    aten.mul.Tensor: 1, aten.mul.Scalar: 1, aten.div.Tensor: 1, aten.div.Scalar: 1,
}


def _is_one(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and v == 1


def _is_two(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and v == 2


def _neutral_operand(target, args, kwargs, env, shape, dtype):
    unit = _NEUTRAL.get(target)
    if unit is None or len(args) < 2 or kwargs.get("rounding_mode") is not None:
        return None
    x, c = args[0], args[1]
    if not isinstance(x, torch.fx.Node) or isinstance(c, torch.fx.Node) or isinstance(c, bool):
        return None
    if not isinstance(c, (int, float)) or c != unit:
        return None
    src = env.get(x)
    if not isinstance(src, Node) or src.dtype != dtype or tuple(src.shape) != tuple(shape or ()):
        return None
    return src


def _is_arange(n, length: int) -> bool:
    """Is ``n`` the constant ``arange(length)`` (int, shape (length,))?"""
    if not isinstance(n, Node) or n.op != "const" or tuple(n.shape) != (length,) or length > 1 << 22:
        return False
    if n.dtype not in (torch.int64, torch.int32):
        return False
    try:
        v = n.attrs.call([])
    except Exception:  # noqa: BLE001 - not materializable here
        return False
    return isinstance(v, torch.Tensor) and v.device.type != "meta" and torch.equal(v, torch.arange(length, dtype=v.dtype))


def _uninitialized(n) -> bool:
    """An allocation whose contents nothing has written yet."""
    return (isinstance(n, Node) and n.op == "call" and n.attrs.kind != "const"
            and _packet(n.attrs.target) in UNINITIALIZED)


def _sunk_shapes(src_shape: tuple, dst_shape: tuple, operands) -> list | None:
    """Can ``view(op(a, b, ..), dst)`` be written ``op(view(a, dst), view(b, s_b), ..)``? For every
    operand that broadcasts (its non-1 dims are a suffix of ``src_shape``), the view must split the
    output at that suffix's boundary: the leading dims it broadcasts over regroup among themselves
    and its own dims among themselves. Then its new shape ``s_b`` is the matching suffix of ``dst``
    (None: the operand stays, a scalar-like one). Returns the new shapes, or None if not possible."""
    out: list = []
    broadcast = False
    for o in operands:
        shape = tuple(o.shape)
        if shape == src_shape:
            out.append(dst_shape)
            continue
        core = list(shape)
        while core and core[0] == 1:
            core.pop(0)
        if not core:
            out.append(None)  # broadcasts everywhere
            continue
        broadcast = True
        k = len(core)
        if k > len(src_shape) or tuple(core) != src_shape[len(src_shape) - k:]:
            return None
        lead = math.prod(src_shape[:len(src_shape) - k])
        m = next((j for j in range(len(dst_shape) + 1) if math.prod(dst_shape[:j]) == lead), None)
        if m is None or m == len(dst_shape) and core:
            return None
        out.append(tuple(dst_shape[m:]))
    # only for an operand that broadcasts (a bias): that is what makes two spellings differ; a view
    # of a plain elementwise result stays where the program put it
    return out if broadcast else None


def _regroups_leading(src_shape: tuple, dst_shape: tuple, operands) -> bool:
    """Viewing ``src_shape`` as ``dst_shape`` only regroups dims in front of the trailing dims every
    non-full operand covers (those keep their size and order), so the operands still broadcast."""
    src_shape, dst_shape = tuple(src_shape), tuple(dst_shape)
    k = 0  # trailing dims some operand does not broadcast over
    for o in operands:
        shape = tuple(o.shape)
        if shape == src_shape:
            continue
        core = list(shape)
        while core and core[0] == 1:
            core.pop(0)
        if not core:
            continue  # a scalar-like operand broadcasts everywhere
        if len(core) > len(src_shape) or tuple(core) != src_shape[len(src_shape) - len(core):]:
            return False
        k = max(k, len(core))
    if k == 0 or k > len(dst_shape) or src_shape[len(src_shape) - k:] != dst_shape[len(dst_shape) - k:]:
        return False
    return math.prod(src_shape[:len(src_shape) - k]) == math.prod(dst_shape[:len(dst_shape) - k])


def _live(nodes: list[Node], inputs: list[Node], outputs: list[Node]) -> list[Node]:
    """``nodes`` without dead code: only what an output or a collective depends on (a collective
    is kept even if its result is unused: every member must issue it), and every input."""
    keep: set[int] = set()
    stack = [*outputs, *(n for n in nodes if n.op == "collective")]
    while stack:
        n = stack.pop()
        if id(n) in keep:
            continue
        keep.add(id(n))
        stack.extend(n.inputs)
    keep.update(id(n) for n in inputs)
    return [n for n in nodes if id(n) in keep]


def _floats(v):
    """Python ints (not bools) below 2**53 in a template entry, as floats."""
    if isinstance(v, Lit) and type(v.value) is int and abs(v.value) < 2 ** 53:
        return Lit(float(v.value))
    if isinstance(v, tuple):
        return tuple(_floats(x) for x in v)
    return v


def _packet(target) -> str:
    try:
        return target.overloadpacket.__name__
    except AttributeError:
        return getattr(target, "__name__", str(target))


def _name(target) -> str:
    s = str(target)
    return s if s.startswith("aten.") else s


def _kind_of(target) -> str:
    tags = getattr(target, "tags", ())
    if torch.Tag.pointwise in tags:
        return "ew"
    return "generic"


def lower(gm: torch.fx.GraphModule, rank: int | None = None, random: str | None = None,
          decompositions: dict | None = None, input_ranges: dict | None = None) -> Graph:
    """Lower ``gm`` (sequential if ``rank`` is None) into the normalized IR.

    ``random`` (`Problem.random`): None lowers random operators as unique values (never equal to
    anything); "refuse" and "identity" also record them in ``graph.random_ops`` (the caller refuses
    them), and "identity" replaces recognised dropout by the identity (see `_dropout_masks`).

    ``decompositions`` (`Problem.decompositions`; None: off, i.e. exact="bitwise"): first rewrite
    the graph into the pointwise normal form (`gg_notebook.ir.pointwise_normal`), then replace every
    call that would lower to a "generic" call by its definition in known operators
    (`gg_notebook.ir.decompose`).

    ``input_ranges``: {input index: (lo, hi)} inclusive bounds of integer inputs (from
    `Problem.domains`), used where a spelling is one value only on a range (`gg_notebook.ir.ranges`)."""
    if decompositions is not None:
        from gg_notebook.ir.decompose import lower_decomposed
        from gg_notebook.ir.pointwise_normal import normalize

        def lower_normalized():
            # one spelling per pointwise function on every program (real mode only), also inside
            # the definitions the decomposition spliced in
            normalize(gm)
            return _Lowerer(gm, rank, random, input_ranges).run()

        return lower_decomposed(gm, rank, decompositions, lower_normalized)
    return _Lowerer(gm, rank, random, input_ranges).run()
