"""Fixtures for the browser tests: a real JupyterLab server and a headless Debian chromium.

* ``lab`` (session scope): a JupyterLab server on a free port, serving a temporary COPY of
  ``notebooks/`` (JupyterLab autosaves, so the repository's notebooks are never touched), with
  temporary Jupyter config/data/settings/workspace dirs and settings that avoid hangs (no news or
  update checks, kernels start without a "Select Kernel" dialog). It is stopped by its own PID in
  a finalizer, also when a test fails.
* ``page`` (function scope): a fresh chromium page; on failure a screenshot and the page's text are
  saved under ``$GG_E2E_ARTIFACTS`` (or the test's ``tmp_path``) and the path is printed.

Locally the tests skip (with the reason) when chromium, playwright or jupyterlab is missing; in CI
(``CI=true``) they fail instead, so that CI really runs them (``.ci/run`` installs chromium and
playwright).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SERVER_START_TIMEOUT = 60.0  # s until /api/status answers


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing_or_fail(reason: str):
    """Skip locally; fail in CI, where the browser tests must really run."""
    if in_ci():
        pytest.fail(f"browser test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def chromium_path() -> str | None:
    env = os.environ.get("GG_E2E_CHROMIUM")
    if env:
        return env if os.path.exists(env) else None
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, method: str = "GET", timeout: float = 5.0):
    req = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body else None


# --------------------------------------------------------------------------- requirements
@pytest.fixture(scope="session")
def browser_stack():
    """The executable of chromium; skips (locally) or fails (CI) when anything is missing."""
    exe = chromium_path()
    if exe is None:
        missing_or_fail("chromium is not installed (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing_or_fail("playwright is not installed (pip install playwright; no `playwright install`)")
    for mod in ("jupyterlab", "ipywidgets", "ipykernel"):
        if importlib.util.find_spec(mod) is None:
            missing_or_fail(f"{mod} is not installed (pip install -e '.[notebook]')")
    return exe


# --------------------------------------------------------------------------- JupyterLab server
class Lab:
    def __init__(self, url: str, root: Path, proc: subprocess.Popen, log: Path):
        self.url, self.root, self.proc, self.log = url, root, proc, log

    def tree_url(self, name: str) -> str:
        # ?reset: start from an empty workspace (no tabs restored from an earlier test)
        return f"{self.url}/lab/tree/{name}?reset"

    def write_notebook(self, name: str, cells: list[str]) -> str:
        """A notebook of code cells in the served (temporary) directory; returns its name."""
        import nbformat

        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}
        nbformat.write(nb, str(self.root / name))
        return name

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _write_settings(settings_dir: Path) -> None:
    files = {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
            {"fetchNews": "false", "checkForUpdates": False},
        # windowingMode "none": every cell stays in the DOM (the default windowing drops cells scrolled
        # out of view, and with them the widgets a test drives)
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings":
            {"autoStartDefaultKernel": True, "windowingMode": "none"},
        # no "Save before closing?" or autosave surprises while the tests click around
        "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings":
            {"autosave": False},
    }
    for rel, data in files.items():
        p = settings_dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(data))


def _shutdown_kernels(url: str) -> None:
    try:
        for k in _http(f"{url}/api/kernels", timeout=3) or []:
            try:
                _http(f"{url}/api/kernels/{k['id']}", method="DELETE", timeout=10)
            except (OSError, urllib.error.URLError):
                pass
    except (OSError, urllib.error.URLError, ValueError):
        pass


def _stop_server(proc: subprocess.Popen, url: str) -> None:
    if proc.poll() is not None:
        return
    # Shut the kernels down through the API first, so no kernel outlives the server.
    _shutdown_kernels(url)
    proc.send_signal(signal.SIGTERM)  # this server's own PID
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def lab(browser_stack, tmp_path_factory):
    base = tmp_path_factory.mktemp("jlab")
    root = base / "notebooks"
    if NOTEBOOKS.is_dir():
        shutil.copytree(NOTEBOOKS, root,
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    else:
        root.mkdir()
    env = dict(os.environ)
    dirs = {k: base / k.lower() for k in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR",
                                           "JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR",
                                           "JUPYTER_RUNTIME_DIR", "IPYTHONDIR")}
    for k, d in dirs.items():
        d.mkdir()
        env[k] = str(d)
    _write_settings(dirs["JUPYTERLAB_SETTINGS_DIR"])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("JUPYTER_TOKEN", None)

    # kernels talk to the server over unix sockets: over TCP each kernel binds ports its manager
    # picked a moment earlier, which another test's process can take in between (a short directory:
    # a unix socket path must stay under ~100 characters)
    sockets = Path(tempfile.mkdtemp(prefix="ggl"))
    log = base / "server.log"
    for attempt in range(3):  # the free port may be taken before the server binds it: another one
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip", "127.0.0.1",
               "--port", str(port), "--ServerApp.port_retries=0", "--IdentityProvider.token=",
               "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
               f"--ServerApp.root_dir={root}", "--LabApp.news_url=",
               # window.jupyterapp: lets the tests wait for a really connected, idle kernel
               "--LabApp.expose_app_in_browser=True",
               "--LabServerApp.extra_labextensions_path=[]",
               "--KernelManager.transport=ipc", f"--KernelManager.ip={sockets / 'k'}"]
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        lab = Lab(url, root, proc, log)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while proc.poll() is None:
            try:
                _http(f"{url}/api/status", timeout=2)
                break
            except (OSError, urllib.error.URLError, ValueError):
                if time.monotonic() > deadline:
                    _stop_server(proc, url)
                    shutil.rmtree(sockets, ignore_errors=True)
                    pytest.fail(f"JupyterLab did not answer /api/status within "
                                f"{SERVER_START_TIMEOUT:.0f} s:\n{lab.log_tail()}", pytrace=False)
                time.sleep(0.25)
        if proc.poll() is None:
            break
        if attempt == 2 or "in use" not in lab.log_tail():
            shutil.rmtree(sockets, ignore_errors=True)
            pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{lab.log_tail()}", pytrace=False)
    try:
        yield lab
    finally:
        _stop_server(proc, url)
        shutil.rmtree(sockets, ignore_errors=True)


# --------------------------------------------------------------------------- browser and page
@pytest.fixture(scope="session")
def browser(browser_stack):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser_stack, headless=True, args=CHROMIUM_ARGS,
                              timeout=60_000)
        try:
            yield b
        finally:
            b.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def _artifact_dir(request, tmp_path) -> Path:
    base = os.environ.get("GG_E2E_ARTIFACTS")
    if base:
        d = Path(base) / request.node.name
    else:
        d = tmp_path / "e2e-artifacts"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture
def artifacts(request, tmp_path) -> Path:
    """Where a test saves its screenshots: ``$GG_E2E_ARTIFACTS/<test>`` or the test's tmp_path (never
    the repository)."""
    return _artifact_dir(request, tmp_path)


@pytest.fixture
def page(browser, lab, request, tmp_path):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(30_000)
    pg = context.new_page()
    console: list[str] = []
    pg.on("console", lambda m: console.append(f"[{m.type}] {m.text}"))
    pg.on("pageerror", lambda e: console.append(f"[pageerror] {e}"))
    try:
        yield pg
    finally:
        failed = any(getattr(request.node, f"rep_{w}", None) is not None
                     and getattr(request.node, f"rep_{w}").failed for w in ("setup", "call"))
        if failed:
            d = _artifact_dir(request, tmp_path)
            try:
                pg.screenshot(path=str(d / "screenshot.png"), full_page=True, timeout=15_000)
            except Exception as e:  # noqa: BLE001 - best effort
                console.append(f"[artifact] screenshot failed: {e}")
            try:
                (d / "page.txt").write_text(pg.inner_text("body", timeout=5_000))
            except Exception as e:  # noqa: BLE001
                console.append(f"[artifact] page text failed: {e}")
            (d / "console.txt").write_text("\n".join(console))
            (d / "server.log").write_text(lab.log_tail(400))
            print(f"\n[e2e] failure artifacts (screenshot, page text, console, server log): {d}")
            sys.stdout.flush()
        context.close()
        _shutdown_kernels(lab.url)  # each test's notebook kernel (torch loaded) goes with it


# --------------------------------------------------------------------------- notebook driving
class NotebookUI:
    """Drives one notebook in JupyterLab 4 (selectors verified with JupyterLab 4.6)."""

    # Not `.jp-Notebook-ExecutionIndicator[data-status='idle']`: it reads "idle" before any kernel
    # exists (Run All clicked then is lost). window.jupyterapp needs --LabApp.expose_app_in_browser.
    KERNEL_READY_JS = """() => {
        const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
        const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
        return !!(k && k.connectionStatus === 'connected' && k.status === 'idle'
                  && w.content && w.content.widgets && w.content.widgets.length);
    }"""
    PROMPTS_JS = """() => [...document.querySelectorAll(
        '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputArea-prompt')]
        .map(p => p.textContent.trim())"""

    def __init__(self, page, lab: Lab):
        self.page, self.lab = page, lab

    def open(self, name: str, timeout: float = 60.0) -> None:
        pg = self.page
        pg.goto(self.lab.tree_url(name), wait_until="domcontentloaded", timeout=timeout * 1000)
        pg.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for(
            state="visible", timeout=timeout * 1000)
        # autoStartDefaultKernel should avoid it, but accept a "Select Kernel" dialog if one shows.
        # The execution indicator says "idle" before any kernel exists, so ask the app itself.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dialog = pg.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept")
            if dialog.count() and dialog.first.is_visible():
                dialog.first.click()
            if pg.evaluate(self.KERNEL_READY_JS):
                return
            pg.wait_for_timeout(250)
        raise AssertionError(f"kernel of {name} not idle within {timeout:.0f} s")

    def run_all(self, attempts: int = 2) -> None:
        """Run > Run All Cells; checks that execution really started (retries once if not)."""
        pg = self.page
        for attempt in range(attempts):
            pg.locator(".lm-MenuBar-item", has_text="Run").first.click()
            pg.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if any(p != "[ ]:" for p in pg.evaluate(self.PROMPTS_JS)):
                    return
                pg.wait_for_timeout(200)
        raise AssertionError("Run All did not start executing the cells")

    def wait_executed(self, timeout: float = 60.0) -> None:
        """Wait until every code cell has an execution count and none is queued/running; fail
        fast with the traceback when a cell raised."""
        pg = self.page
        deadline = time.monotonic() + timeout
        while True:
            err = pg.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            tb = [t for t in err.all_inner_texts()
                  if re.search(r"Traceback|^\w*(Error|Exception)\b", t, re.M)]
            if tb:
                raise AssertionError("a notebook cell raised:\n" + "\n".join(tb)[-4000:])
            prompts = pg.evaluate(self.PROMPTS_JS)
            if prompts and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts) \
                    and pg.evaluate(self.KERNEL_READY_JS):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"cells not all executed within {timeout:.0f} s: {prompts}")
            pg.wait_for_timeout(250)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """The kernel is connected and idle (e.g. after a widget click ran its handler)."""
        self.page.wait_for_function(self.KERNEL_READY_JS, timeout=timeout * 1000, polling=200)


@pytest.fixture
def notebook_ui(page, lab):
    return NotebookUI(page, lab)
