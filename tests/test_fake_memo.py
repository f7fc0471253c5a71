"""`capture.fake_memo.FakeDispatchMemo` changes no result: every operator call it answers from its
memo gives what FakeTensorMode (without any cache) gives, across PyTorch's operator database
(OpInfo samples: views, in-place and out= variants, reductions, factories, several dtypes), and on
arguments chosen to differ only where a careless key would conflate them."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from gg_notebook.capture.fake_memo import FakeDispatchMemo


class _Memoized(TorchDispatchMode):
    def __init__(self, memo: FakeDispatchMemo) -> None:
        super().__init__()
        self.memo = memo

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.memo(func, args, kwargs or {})


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _describe(out, inputs) -> list:
    """Each tensor of ``out``: metadata, and which input it is or shares storage with."""
    ins = [x for x in torch.utils._pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor)]
    desc = []
    for o in torch.utils._pytree.tree_leaves(out):
        if not isinstance(o, torch.Tensor):
            desc.append(("value", type(o).__name__, repr(o)))
            continue
        assert isinstance(o, FakeTensor)
        same = [i for i, x in enumerate(ins) if x is o]
        shares = [i for i, x in enumerate(ins) if _storage(x) == _storage(o)]
        desc.append((tuple(o.shape), o.stride(), o.dtype, o.fake_device, o.storage_offset(),
                     o.untyped_storage().nbytes(), o.is_conj(), o.is_neg(), o.requires_grad,
                     o._is_view(), tuple(same), tuple(shares)))
    return desc


def _run(fn, make_inputs, memo_on: bool):
    mode = FakeTensorMode()
    if not memo_on:
        mode.cache_enabled = False  # the reference: FakeTensorMode's own kernels, no cache at all
    memo = FakeDispatchMemo(mode)
    results = []
    for _ in range(3):  # the first call fills the memo, the next ones are answered from it
        inputs = make_inputs(mode)
        if memo_on:
            with mode, _Memoized(memo):
                out = fn(*inputs)
        else:
            with mode:
                out = fn(*inputs)
        results.append(_describe(out, inputs))
    return results, memo


def _same_as_fake_mode(fn, make_inputs) -> int:
    got, memo = _run(fn, make_inputs, True)
    want, _ = _run(fn, make_inputs, False)
    assert got == want
    return memo.hits


def _fakes(mode: FakeTensorMode, *reals):
    return [mode.from_tensor(r) if isinstance(r, torch.Tensor) else r for r in reals]


def _op_db_cases():
    from torch.testing._internal.common_methods_invocations import op_db

    cases = []
    for op in op_db:
        for dtype in (torch.float32, torch.int64, torch.complex64):
            if dtype not in op.supported_dtypes("cpu"):
                continue
            cases.append(pytest.param(op, dtype, id=f"{op.name}.{op.variant_test_name}-{dtype}".replace("torch.", "")))
    return cases


_SKIP_OPS = {
    # random samplers, data-dependent shapes or Python-side data reads: no cacheable call to compare
    "nonzero", "nonzero_static", "masked_select", "unique", "unique_consecutive", "bernoulli", "multinomial",
    "normal", "uniform", "randint", "randn", "rand", "randint_like", "randn_like", "rand_like", "item",
    "tolist", "allclose", "equal", "argwhere", "repeat_interleave", "bincount", "histc", "histogram",
    "histogramdd", "combinations", "sparse", "to_sparse", "masked_scatter", "index_reduce",
}


def _run_samples(op, samples, memo_on: bool) -> tuple[list, FakeDispatchMemo]:
    """Every sample twice, in one fake mode with one memo (samples of other shapes, strides, flags
    and keyword arguments meet the entries of the ones before); what each run gave, or the error."""
    mode = FakeTensorMode()
    if not memo_on:
        mode.cache_enabled = False  # the reference: FakeTensorMode's own kernels, no cache at all
    memo = FakeDispatchMemo(mode)
    results = []
    for _ in range(2):
        for s in samples:
            inputs = torch.utils._pytree.tree_map_only(torch.Tensor, mode.from_tensor, [s.input, *s.args])
            try:
                if memo_on:
                    with mode, _Memoized(memo):
                        out = op(*inputs, **s.kwargs)
                else:
                    with mode:
                        out = op(*inputs, **s.kwargs)
                results.append(_describe(out, inputs))
            except Exception as e:  # noqa: BLE001 - the fake mode cannot run this sample
                results.append(("raised", type(e).__name__))
    return results, memo


@pytest.mark.parametrize("op,dtype", _op_db_cases()[::5])
def test_memo_answers_as_fake_mode_on_pytorch_operators(op, dtype):
    """A fifth of OpInfo's (operator, dtype) pairs, each on up to 6 of its sample inputs run twice
    through one memo: every answer equals FakeTensorMode's uncached one."""
    if op.name.split(".")[0] in _SKIP_OPS or "sparse" in op.name:
        pytest.skip("no fake-tensor cacheable call")
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=False))[:6]
    want, _ = _run_samples(op, samples, False)
    got, _ = _run_samples(op, samples, True)
    assert got == want


def test_the_memo_is_used():
    hits = _same_as_fake_mode(lambda x, y: (x @ y).relu().sum(0), lambda m: _fakes(m, torch.randn(4, 5), torch.randn(5, 3)))
    assert hits >= 6  # 3 calls x 2 later runs (matmul may decompose)


@pytest.mark.parametrize("make", [
    # a non-contiguous argument: the result's strides follow
    lambda m: _fakes(m, torch.randn(6, 4).t()),
    lambda m: _fakes(m, torch.randn(4, 6)),
    # a storage offset, and a larger storage behind the same sizes
    lambda m: _fakes(m, torch.randn(10, 4)[3:7]),
    lambda m: _fakes(m, torch.randn(4, 4)),
    # conj / neg bits (lazy views)
    lambda m: _fakes(m, torch.randn(4, 4, dtype=torch.complex64).conj()),
    lambda m: _fakes(m, torch.randn(4, 4, dtype=torch.complex64)),
    lambda m: _fakes(m, torch.randn(4, 4, dtype=torch.complex64).conj().imag),
    # requires_grad (a leaf), dtypes
    lambda m: _fakes(m, torch.randn(4, 4, requires_grad=True)),
    lambda m: _fakes(m, torch.randn(4, 4, dtype=torch.float64)),
    lambda m: _fakes(m, torch.randn(4, 4).to(torch.bfloat16)),
])
def test_tensors_differing_only_in_metadata_are_told_apart(make):
    """One memo across all of them: a key that dropped any of strides, offset, storage size, conj/neg,
    requires_grad or dtype would answer one from another's entry."""
    mode = FakeTensorMode()
    memo = FakeDispatchMemo(mode)
    cases = [lambda m: _fakes(m, torch.randn(6, 4).t()), lambda m: _fakes(m, torch.randn(4, 6)),
             lambda m: _fakes(m, torch.randn(10, 4)[3:7]), lambda m: _fakes(m, torch.randn(4, 4)),
             lambda m: _fakes(m, torch.randn(4, 4, dtype=torch.complex64).conj()),
             lambda m: _fakes(m, torch.randn(4, 4, dtype=torch.complex64)),
             lambda m: _fakes(m, torch.randn(4, 4, requires_grad=True)),
             lambda m: _fakes(m, torch.randn(4, 4, dtype=torch.float64)), make]
    ref = FakeTensorMode()
    ref.cache_enabled = False
    for fn in (lambda x: x * 2, lambda x: x.contiguous(), lambda x: torch.empty_like(x), lambda x: x.view(-1)
               if x.is_contiguous() else x.reshape(-1), lambda x: x.resolve_conj(), lambda x: x.sum(0),
               lambda x: x.add_(1) if not x.requires_grad else x + 1, lambda x: x.clone().t_()):
        for c in cases:
            try:
                with ref:
                    xs = c(ref)
                    want = _describe(fn(*xs), xs)
            except Exception:  # noqa: BLE001
                continue
            with mode, _Memoized(memo):
                xs = c(mode)
                got = _describe(fn(*xs), xs)
            assert got == want
    assert memo.hits > 0


@pytest.mark.parametrize("fn", [
    lambda x: x + 1, lambda x: x + 1.0, lambda x: x + True, lambda x: x * -0.0,
    lambda x: torch.full((2, 3), 1), lambda x: torch.full((2, 3), 1.0), lambda x: torch.full((2, 3), True),
    lambda x: torch.ones(3), lambda x: torch.ones(3, dtype=torch.float16),
    lambda x: torch.zeros(3, device="meta"), lambda x: x.sum(0, keepdim=True), lambda x: x.sum(0),
    lambda x: x.to(torch.float64), lambda x: torch.arange(5), lambda x: torch.arange(5.0),
])
def test_python_numbers_by_type_and_value(fn):
    """``x + 1`` and ``x + 1.0`` (int and float scalars) give other dtypes; so do factories' fill
    values and keyword flags: one memo across all of them answers each as FakeTensorMode does."""
    mode = FakeTensorMode()
    memo = FakeDispatchMemo(mode)
    ref = FakeTensorMode()
    ref.cache_enabled = False
    others = [lambda x: x + 1, lambda x: x + 1.0, lambda x: x + True, lambda x: torch.full((2, 3), 1),
              lambda x: torch.full((2, 3), 1.0), lambda x: torch.ones(3), lambda x: x.sum(0), fn]
    for g in others + others:
        with ref:
            x = ref.from_tensor(torch.arange(6).reshape(2, 3))
            want = _describe(g(x), [x])
        with mode, _Memoized(memo):
            x = mode.from_tensor(torch.arange(6).reshape(2, 3))
            got = _describe(g(x), [x])
        assert got == want


def test_default_dtype_is_part_of_the_key():
    mode = FakeTensorMode()
    memo = FakeDispatchMemo(mode)
    saved = torch.get_default_dtype()
    try:
        dtypes = []
        for d in (torch.float32, torch.float64, torch.float32, torch.float64):
            torch.set_default_dtype(d)
            with mode, _Memoized(memo):
                dtypes.append(torch.ones(3).dtype)
    finally:
        torch.set_default_dtype(saved)
    assert dtypes == [torch.float32, torch.float64, torch.float32, torch.float64]
    assert memo.hits == 2


def test_steps_aside_under_make_fx():
    """Below a proxy mode the memo must not answer: the graph would miss the call."""
    from torch.fx.experimental.proxy_tensor import make_fx

    mode = FakeTensorMode()
    memo = FakeDispatchMemo(mode)

    def f(x):
        with _Memoized(memo):
            return (x * 2) * 2

    with mode:
        x = mode.from_tensor(torch.randn(3))
    for _ in range(2):
        gm = make_fx(f, tracing_mode="fake")(torch.randn(3))
        assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.ops.aten.mul.Tensor] * 2
    assert memo.hits == 0


def test_constants_step_aside():
    """A fake tensor that knows its value (small ``torch.tensor`` constants) goes to FakeTensorMode,
    which propagates the value: never from the memo."""
    mode = FakeTensorMode()
    memo = FakeDispatchMemo(mode)
    ys = []
    for _ in range(3):
        with mode, _Memoized(memo):
            c = torch.tensor(3.0)  # a fake tensor with a constant
            ys.append(c * 2)
    assert all(isinstance(y, FakeTensor) and y.constant is not None and float(y.constant) == 6.0 for y in ys)
    assert memo.hits == 0


def _matmuls_and_grads(x, w, b):
    """Batched matmuls (each ends in ``_unsafe_view``), reshapes of views, and their backward."""
    h = torch.matmul(x, w) + b  # [B, S, K] @ [K, N]: mm on the folded batch, then _unsafe_view
    g = torch.matmul(h.transpose(1, 2), h)  # bmm of a non-contiguous view
    y = (g.reshape(g.shape[0], -1).relu() * 0.5).sum()
    y.backward()
    return h, g, y, x.grad, w.grad, b.grad


@pytest.mark.parametrize("shapes", [((2, 3, 4), (4, 5), (5,)), ((1, 7, 8), (8, 8), (8,)), ((3, 1, 2), (2, 6), (1,))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_unsafe_view_and_fresh_results_answer_as_fake_mode(shapes, dtype):
    """The two shortcuts (`_unsafe_view` asked as `view`, fresh results made from the remembered
    metadata) give what FakeTensorMode gives without any cache: every result and gradient (sizes,
    strides, offset, storage, view-ness, requires_grad) of a forward and backward run three times."""
    def make(m):
        return _fakes(m, *(torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes))

    got, memo = _run(_matmuls_and_grads, make, True)
    want, _ = _run(_matmuls_and_grads, make, False)
    assert got == want
    assert memo.hits > 0
    assert not any(k[0] is torch.ops.aten._unsafe_view.default for k in memo.entries)  # asked as view
    assert any(k[0] is torch.ops.aten.view.default and v is not None for k, v in memo.entries.items())
    assert any(v is not None and v[2] is not None for v in memo.entries.values())  # fresh results made directly
