"""The cyclic garbage collector kept off the engine's long-lived heap.

Indexing and inference allocate millions of small objects that live as long as the run (terms,
their tables, memo entries). Python's full collections scan every tracked object again and again
(their number grows with the model, so the total with its square on a large model: a quarter of a
405B-shaped model's inference, half of its index). `long_lived_heap` freezes (`gc.freeze`) what
exists when a block starts and gives the block ``keep()``, which freezes what exists now: called
between steps, so that the collector still sees a step's own young objects but no longer the
survivors of earlier steps. Everything is unfrozen when the block ends (cyclic garbage a step left
behind is collected then, by the next full collection). A heap some caller froze, or a disabled
collector, is left as it is. This changes when memory is reclaimed, never a value."""

from __future__ import annotations

import contextlib
import gc


def _nothing() -> None:
    return None


_ours = [0]  # blocks of ours running (nested: an index built inside an inference, engine/induction.py)


@contextlib.contextmanager
def long_lived_heap():
    """Freeze the heap for a block; yields ``keep()`` (freeze what exists now, or nothing when the
    collector or the freeze is not ours). A block inside one of ours only shares it: asking the
    collector whether something is frozen walks every frozen object."""
    if _ours[0] or not gc.isenabled() or gc.get_freeze_count():
        yield _nothing
        return
    gc.freeze()
    _ours[0] += 1
    try:
        yield gc.freeze
    finally:
        _ours[0] -= 1
        gc.unfreeze()

