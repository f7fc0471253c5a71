"""Notebook widgets: `SessionWidget`, a thin ipywidgets view over a `ProofSession`, and `GraphWidget`,
the session's graph (an anywidget; imported on first use, as it needs ``anywidget``)."""

from gg_notebook.widgets.session_widget import SessionWidget

__all__ = ["SessionWidget", "GraphWidget"]


def __getattr__(name: str):
    if name == "GraphWidget":
        from gg_notebook.widgets.graph_widget import GraphWidget

        return GraphWidget
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
