"""Proves the harness: a plain ipywidgets Button renders and its click reaches the kernel."""

import pytest

pytestmark = pytest.mark.timeout(150)


def test_plain_ipywidget_button_roundtrip(lab, page, notebook_ui):
    name = lab.write_notebook("harness_smoke.ipynb", [
        "import ipywidgets as w\n"
        "n = [0]\n"
        "label = w.Label('count 0')\n"
        "b = w.Button(description='Step')\n"
        "def f(_):\n"
        "    n[0] += 1\n"
        "    label.value = f'count {n[0]}'\n"
        "b.on_click(f)\n"
        "w.VBox([b, label])",
    ])
    notebook_ui.open(name)
    notebook_ui.run_all()
    notebook_ui.wait_executed(timeout=60)
    widget = page.locator(".jupyter-widgets").first
    widget.wait_for(state="visible", timeout=30_000)
    page.locator(".jupyter-widgets button", has_text="Step").click()
    page.get_by_text("count 1").wait_for(timeout=15_000)
    page.locator(".jupyter-widgets button", has_text="Step").click()
    page.get_by_text("count 2").wait_for(timeout=15_000)
