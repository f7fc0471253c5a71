"""Capture: turn a `Problem` into value-semantics fx graphs (sequential + one per rank).

See tracing.py (make_fx + fake process group), source.py (user source locations on nodes),
collectives.py (collective_result nodes, CollectiveInfo, cross-rank matching), errors.py.
"""

from gg_notebook.capture.collectives import CollectiveInfo, MatchedCollective, collective_result
from gg_notebook.capture.errors import CaptureError
from gg_notebook.capture.tracing import CapturedProgram, capture_layout, capture_problem

__all__ = [
    "CaptureError", "CapturedProgram", "CollectiveInfo", "MatchedCollective", "capture_layout",
    "capture_problem", "collective_result",
]
