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


def _raw_stack(start) -> list[tuple[str, int, str]]:
    """(filename, lineno, name) of every frame from ``start`` outwards, innermost first."""
    out = []
    f = start
    while f is not None:
        out.append((f.f_code.co_filename, f.f_lineno, f.f_code.co_name))
        f = f.f_back
    return out


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
    def __init__(self) -> None:
        self.fwd_frames: dict[int, list[Frame]] = {}

    def annotate(self, node: torch.fx.Node) -> None:
        if _extra_meta:
            node.meta.update(_extra_meta)
        if node.op != "call_function" or "gg_frames" in _extra_meta:
            return
        raw = _raw_stack(sys._getframe(2))  # innermost first, skipping the tracer's own frames
        in_backward = torch._C._current_autograd_node() is not None
        if not in_backward:
            frames = [_frame_tuple(*fr) for fr in reversed(raw) if is_user_file(fr[0])]
            kind = "forward_code"
            seq = torch.autograd._get_sequence_nr() - 1
            if frames:
                self.fwd_frames.setdefault(seq, frames)
        else:
            # Split the stack at the autograd entry point (autograd.grad / backward).
            entry = next((i for i, fr in enumerate(raw) if (fr[0], fr[2]) in _AUTOGRAD_ENTRY), None)
            inner = raw if entry is None else raw[:entry]
            outer = [] if entry is None else raw[entry:]
            inner_user = [fr for fr in inner if is_user_file(fr[0])]
            outer_user = [_frame_tuple(*fr) for fr in reversed(outer) if is_user_file(fr[0])]
            if inner_user:
                kind = "backward_code"
                frames = outer_user + [_frame_tuple(*fr) for fr in reversed(inner_user)]
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
        node.meta["gg_frames"] = frames
        node.meta["gg_source"] = format_source(frames[-1]) if frames else None
        node.meta["gg_source_kind"] = kind
        if frames:
            node.meta["stack_trace"] = format_frames(frames)


@contextmanager
def record_sources() -> Iterator[_Recorder]:
    """Annotate every node the make_fx tracer creates with user source locations (restored after)."""
    recorder = _Recorder()
    original = PythonKeyTracer.create_node

    def create_node(self, *args, **kwargs):
        node = original(self, *args, **kwargs)
        recorder.annotate(node)
        return node

    PythonKeyTracer.create_node = create_node
    try:
        yield recorder
    finally:
        PythonKeyTracer.create_node = original


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
