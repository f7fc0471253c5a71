"""`CaptureError`: a program could not be turned into a graph, or the ranks' graphs do not line up."""

from __future__ import annotations


class CaptureError(Exception):
    """Capturing failed. ``rank`` is None for the sequential program; ``source`` is "file.py:LINE"."""

    def __init__(self, message: str, *, rank: int | None = None, source: str | None = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.source = source


def program_name(rank: int | None) -> str:
    return "the sequential program" if rank is None else f"rank {rank}"
