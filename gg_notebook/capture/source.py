"""User source locations for graph nodes.

While a program is traced, `record_sources()` wraps `PythonKeyTracer.create_node` so that every node
gets ``meta["gg_frames"]`` (the user's frames, outermost first, as (file, line, function, text)) and
``meta["gg_source"]`` ("file.py:LINE" of the innermost user frame, or None). User code is anything
outside the torch package, the Python standard library and gg_notebook itself; gg_notebook/examples
counts as user code.

Backward nodes (created while `torch.autograd.grad` / `.backward()` runs inside the traced function)
carry ``meta["gg_backward"] = True`` and ``meta["gg_source_kind"]``:
  - "backward_code": user code runs in the backward (a custom autograd.Function's backward); the
    innermost frame of that code is the source.
  - "forward": an autograd-generated gradient op; the source is the forward line whose op produced
    the autograd node (matched by autograd sequence number), gg_frames are that line's frames.
  - "grad_call": no forward op could be matched; the source is the line that called autograd.grad.
Forward nodes have gg_source_kind "forward_code".
"""

from __future__ import annotations

import linecache
import os
import sys
import sysconfig
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.fx.experimental.proxy_tensor import PythonKeyTracer

Frame = tuple  # (filename, lineno, function name, source line text)

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_GG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_GG_EXAMPLES = _GG_DIR + "examples" + os.sep
_STDLIB_DIRS = tuple(
    {os.path.abspath(p) + os.sep for p in (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"])}
)
_SITE_DIRS = tuple(
    {os.path.abspath(p) + os.sep for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}
)
_WRAPPER_FILES = {"typing_extensions.py"}
_user_file_cache: dict[str, bool] = {}

# Meta entries merged into every node created while set (used by the collective shims).
_extra_meta: dict = {}


def is_user_file(filename: str) -> bool:
    """Whether frames in ``filename`` are the user's code (see module docstring)."""
    r = _user_file_cache.get(filename)
    if r is None:
        if filename.startswith("<") and filename.endswith(">"):
            # "<ipython-input-..>" / "<string>" cells are user code; "<frozen ...>" is not.
            r = not filename.startswith("<frozen")
        else:
            p = os.path.abspath(filename)
            if p.startswith(_GG_EXAMPLES):
                r = True
            elif p.startswith(_TORCH_DIR) or p.startswith(_GG_DIR):
                r = False
            elif p.startswith(_STDLIB_DIRS) and not p.startswith(_SITE_DIRS):
                r = False
            elif os.path.basename(p) in _WRAPPER_FILES and p.startswith(_SITE_DIRS):
                r = False  # decorator plumbing (e.g. typing_extensions.deprecated) is not user code
            else:
                r = True
        _user_file_cache[filename] = r
    return r


def format_source(frame: Frame | None) -> str | None:
    if frame is None:
        return None
    return f"{_short(frame[0])}:{frame[1]}"


def _short(filename: str) -> str:
    try:
        rel = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if rel.startswith("..") else rel


def _frame_tuple(filename: str, lineno: int, name: str) -> Frame:
    return (filename, lineno, name, linecache.getline(filename, lineno).strip())


def user_frames_of_traceback(tb) -> list[Frame]:
    """User frames of an exception traceback, outermost first."""
    frames = []
    while tb is not None:
        code = tb.tb_frame.f_code
        if is_user_file(code.co_filename):
            frames.append(_frame_tuple(code.co_filename, tb.tb_lineno, code.co_name))
        tb = tb.tb_next
    return frames


def format_frames(frames: list[Frame]) -> str:
    return "\n".join(f'  File "{f}", line {l}, in {n}\n    {t}' for f, l, n, t in frames)


_AUTOGRAD_ENTRY = {
    (os.path.join(_TORCH_DIR, "autograd", "__init__.py"), "grad"),
    (os.path.join(_TORCH_DIR, "autograd", "__init__.py"), "backward"),
    (os.path.join(_TORCH_DIR, "_tensor.py"), "backward"),
}


class _Recorder:
    """Annotates nodes while a program is traced. The user frames of a node are found by one walk
    up the stack that keeps only user frames; their source text and the strings made from them are
    computed once per trace (a 405B-shaped rank creates tens of thousands of nodes from a few hundred
    lines)."""

    def __init__(self) -> None:
        self.fwd_frames: dict[int, list[Frame]] = {}
        self._frames: dict[tuple, Frame] = {}  # (file, line, name) -> Frame
        self._texts: dict[tuple, tuple] = {}  # the frames of a node -> (gg_source, stack_trace)

    def _frame(self, raw: tuple) -> Frame:
        fr = self._frames.get(raw)
        if fr is None:
            fr = self._frames[raw] = _frame_tuple(*raw)
        return fr

    def annotate(self, node: torch.fx.Node) -> None:
        if _extra_meta:
            node.meta.update(_extra_meta)
        if node.op != "call_function" or "gg_frames" in _extra_meta:
            return
        in_backward = torch._C._current_autograd_node() is not None
        # the user frames (innermost first) before and after the autograd entry point
        # (autograd.grad / backward), skipping the tracer's own frames; all "inner" in the forward
        inner: list = []
        outer: list = []
        user = inner
        cache = _user_file_cache
        f = sys._getframe(2)
        while f is not None:
            code = f.f_code
            name = code.co_filename
            if in_backward and user is inner and (name, code.co_name) in _AUTOGRAD_ENTRY:
                user = outer
            mine = cache.get(name)
            if mine is None:
                mine = is_user_file(name)
            if mine:
                user.append((name, f.f_lineno, code.co_name))
            f = f.f_back
        if not in_backward:
            frames = [self._frame(fr) for fr in reversed(inner)]
            kind = "forward_code"
            seq = torch.autograd._get_sequence_nr() - 1
            if frames:
                self.fwd_frames.setdefault(seq, frames)
        else:
            outer_user = [self._frame(fr) for fr in reversed(outer)]
            if inner:
                kind = "backward_code"
                frames = outer_user + [self._frame(fr) for fr in reversed(inner)]
            else:
                node_ = torch._C._current_autograd_node()
                fwd = None
                try:
                    fwd = self.fwd_frames.get(node_._sequence_nr())
                except Exception:  # pragma: no cover - defensive
                    fwd = None
                if fwd:
                    kind, frames = "forward", fwd
                else:
                    kind, frames = "grad_call", outer_user
            node.meta["gg_backward"] = True
        texts = None
        if frames:
            key = tuple(frames)
            texts = self._texts.get(key)
            if texts is None:
                texts = self._texts[key] = (format_source(frames[-1]), format_frames(frames))
        node.meta["gg_frames"] = frames
        node.meta["gg_source"] = texts[0] if texts else None
        node.meta["gg_source_kind"] = kind
        if texts:
            node.meta["stack_trace"] = texts[1]


@contextmanager
def record_sources() -> Iterator[_Recorder]:
    """Annotate every node the make_fx tracer creates with user source locations (restored after)."""
    global _active
    recorder = _Recorder()
    original = PythonKeyTracer.create_node

    def create_node(self, *args, **kwargs):
        node = original(self, *args, **kwargs)
        recorder.annotate(node)
        return node

    PythonKeyTracer.create_node = create_node
    saved, _active = _active, recorder
    try:
        yield recorder
    finally:
        PythonKeyTracer.create_node = original
        _active = saved


_active: _Recorder | None = None  # the recorder of the innermost `record_sources` block


def annotate_node(node: torch.fx.Node) -> None:
    """Annotate a node made by a tracer other than make_fx's (`capture.direct_trace`) as make_fx's
    nodes are: user source inside `record_sources`, and `extra_node_meta` always."""
    if _active is not None:
        _active.annotate(node)
    elif _extra_meta:
        node.meta.update(_extra_meta)


@contextmanager
def extra_node_meta(**meta) -> Iterator[None]:
    """Merge ``meta`` into every node created inside the block."""
    saved = dict(_extra_meta)
    _extra_meta.update(meta)
    try:
        yield
    finally:
        _extra_meta.clear()
        _extra_meta.update(saved)
