"""gc.freeze in this process, with one owner: the engine's long-lived heap (`engine/heap.py`), the
capture's loop over its forked children (`capture/forked.py`) and unpickling graphs (`ir/serialize.py`).

`frozen()` freezes what exists when a block starts (`gc.freeze`: the collector no longer rescans it);
only the outermost block of ours unfreezes, when it ends. A block inside another freezes again (what
the outer block made since is old by then) and leaves unfreezing to the outer one, so no block ever
unfreezes what an enclosing one froze. This changes when memory is reclaimed, never a value."""

from __future__ import annotations

import contextlib
import gc

_depth = [0]  # blocks of ours running


@contextlib.contextmanager
def frozen(respect_caller: bool = False):
    """Freeze the heap for a block; yields whether the collector is on and the freeze ours.
    ``respect_caller``: outside any block of ours, a heap someone else froze (or a disabled
    collector) is left as it is (yields False); asking whether anything is frozen walks every
    frozen object, so only an outermost block asks."""
    if not gc.isenabled():
        yield False
        return
    if _depth[0]:
        gc.freeze()
        yield True
        return
    if respect_caller and gc.get_freeze_count():
        yield False
        return
    gc.freeze()
    _depth[0] += 1
    try:
        yield True
    finally:
        _depth[0] -= 1
        gc.unfreeze()
