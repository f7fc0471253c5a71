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

from gg_notebook.frozen import frozen


def _nothing() -> None:
    return None


@contextlib.contextmanager
def long_lived_heap():
    """Freeze the heap for a block; yields ``keep()`` (freeze what exists now, or nothing when the
    collector or the freeze is not ours). Inside another block of ours (an index built during an
    inference, `engine/induction.py`) it freezes again and leaves unfreezing to the outer block."""
    with frozen(respect_caller=True) as ours:
        yield gc.freeze if ours else _nothing
