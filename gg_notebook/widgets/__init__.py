"""Notebook widgets: `SessionWidget`, a thin ipywidgets view over a `ProofSession`."""

from gg_notebook.widgets.session_widget import SessionWidget

__all__ = ["SessionWidget"]
