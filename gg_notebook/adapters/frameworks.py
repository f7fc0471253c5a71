"""Framework adapters for `from_modules`: what a library needs to be captured per rank on a CPU,
and where it writes how each parameter is split.

Each adapter is a module ``gg_notebook.adapters.<name>`` exposing ``ADAPTER`` with ``name``,
``package``, ``install``, ``shims()`` (a context manager entered around building and tracing, in the
program's own process; it restores what it patches), ``placement(model, name, local, global_shape,
rank, world_size)`` and ``grad_placement(model, name, local, placement)`` (``None``: not the
adapter's business). An adapter is used only when its package is already imported (the user's
builders import it), so no framework is ever imported by gg_notebook on its own.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Iterator

# adapter module -> the top-level package whose presence in sys.modules activates it
KNOWN = {
    "megatron": "megatron.core",
    "transformers": "transformers",
    "torchtitan": "torchtitan",
}


def active_adapters() -> tuple:
    """The adapters of the frameworks imported in this process, in `KNOWN` order."""
    out = []
    for module, package in KNOWN.items():
        if package in sys.modules:
            try:
                mod = importlib.import_module(f"gg_notebook.adapters.{module}")
            except ModuleNotFoundError as e:
                if e.name == f"gg_notebook.adapters.{module}":
                    continue  # no adapter for it (yet)
                raise
            out.append(mod.ADAPTER)
    return tuple(out)


@contextlib.contextmanager
def shims(adapters) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for a in adapters:
            stack.enter_context(a.shims())
        yield


def read_placement(adapters, model, name, local, global_shape, rank, world_size):
    """``(placement, adapter name)`` from the first adapter that knows the tensor, else ``(None, "")``."""
    for a in adapters:
        p = a.placement(model, name, local, global_shape, rank, world_size)
        if p is not None:
            return p, a.name
    return None, ""


def read_grad_placement(adapters, model, name, local, placement):
    for a in adapters:
        p = a.grad_placement(model, name, local, placement)
        if p is not None:
            return p
    return None


def require(package: str, install: str, what: str):
    """Import ``package`` or raise an ImportError that says how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ImportError(
            f"{what} needs the {package.split('.')[0]} package, which is not installed ({e}). Install it with: {install}"
        ) from e
