"""Load program source text as a fresh module backed by a real file, so that source lines resolve.

Every load gets its own module object (module-level state starts fresh, like a new process) and its
own file under one temporary directory per process. Source derived from a built-in example keeps its
relative imports working by loading it as a submodule of ``gg_notebook.examples``.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import itertools
import os
import re
import shutil
import sys
import tempfile
import types

_DIR: str | None = None
_COUNTER = itertools.count()


def _tmpdir() -> str:
    global _DIR
    if _DIR is None or not os.path.isdir(_DIR):
        _DIR = tempfile.mkdtemp(prefix=f"gg_fuzz_{os.getpid()}_")
        atexit.register(shutil.rmtree, _DIR, True)
    return _DIR


def load_source(source: str, stem: str, package: str | None = None) -> types.ModuleType:
    """Execute ``source`` as a new module; ``package`` (e.g. ``"gg_notebook.examples"``) for relative imports."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:10]
    n = next(_COUNTER)
    base = f"fuzz_{stem}_{digest}_{n}"
    path = os.path.join(_tmpdir(), base + ".py")
    with open(path, "w") as f:
        f.write(source)
    name = f"{package}.{base}" if package else base
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if package:
        module.__package__ = package
    sys.modules[name] = module  # dataclasses / pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def unload(module: types.ModuleType) -> None:
    sys.modules.pop(module.__name__, None)


_LOADED = re.compile(r"(^|\.)fuzz_\w+_[0-9a-f]{10}_\d+$")


def unload_all() -> None:
    """Forget every module this loader made (long runs would otherwise keep them all alive)."""
    for name in [n for n in sys.modules if _LOADED.search(n)]:
        del sys.modules[name]
