"""Built-in examples: Megatron-style distributed programs, each with realistic bug variants.

``EXAMPLES[name].make(world_size=2, bug=None, **sizes)`` returns a `Problem`. Every bug's
``culprit_marker`` tags (``# gg: <tag>``) the line of the *sequential* function holding the first
operator that can no longer be related to the ranks' tensors; `marker_line` finds it.
"""

from __future__ import annotations

import functools
import inspect
import os
import types

from ._types import Bug, Example

_MODULES = (
    "mlp", "attention", "attention_fused_qkv", "vocab_embedding", "vocab_cross_entropy",
    "sp_layernorm_mlp", "gpt_block", "gpt", "pipeline", "zero", "bounds", "context", "experts", "data_parallel", "mesh",
    "dtensor",
)


def _load() -> dict[str, Example]:
    import importlib

    out: dict[str, Example] = {}
    for mod in _MODULES:
        m = importlib.import_module(f"{__name__}.{mod}")
        for ex in m.EXAMPLES:
            out[ex.name] = ex
    return out


EXAMPLES: dict[str, Example] = _load()


def get(name: str) -> Example:
    """The example called ``name`` (KeyError listing the known names otherwise)."""
    try:
        return EXAMPLES[name]
    except KeyError:
        raise KeyError(f"no example {name!r}; known: {', '.join(EXAMPLES)}") from None


def _unwrap(fn):
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.unwrap(fn) if callable(fn) else fn


def marker_line(fn_or_module, tag: str) -> str:
    """``"path.py:LINE"`` of the single line carrying ``# gg: <tag>``.

    Looks in the function's own source first (functools.partial is unwrapped), then in its whole
    module file (the marker of a backward example sits in the forward function it differentiates).
    A tag ``"<module>:<tag>"`` names the example module whose file carries it (an example that
    calls another example's model: ``"zero:loss"``).
    """
    obj = _unwrap(fn_or_module)
    if ":" in tag:
        import importlib

        mod, tag = tag.split(":", 1)
        obj = importlib.import_module(f"{__name__}.{mod}")
    path = inspect.getsourcefile(obj)
    needle = f"# gg: {tag}"

    def hits(lines, first):
        return [first + i for i, line in enumerate(lines) if _has_tag(line, needle)]

    found: list[int] = []
    if not isinstance(obj, types.ModuleType):
        lines, start = inspect.getsourcelines(obj)
        found = hits(lines, start)
    if not found:
        with open(path) as f:
            found = hits(f.read().splitlines(), 1)
    if len(found) != 1:
        raise LookupError(f"tag {tag!r} marks {len(found)} lines in {path}, expected exactly one")
    return f"{os.path.abspath(path)}:{found[0]}"


def _has_tag(line: str, needle: str) -> bool:
    i = line.find(needle)
    if i < 0:
        return False
    rest = line[i + len(needle):]
    return not rest or not (rest[0].isalnum() or rest[0] == "_")


__all__ = ["Bug", "EXAMPLES", "Example", "get", "marker_line"]
