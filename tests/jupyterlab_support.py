"""A real JupyterLab server and a real (Debian) chromium driven by Playwright, for tests.

Nothing here downloads anything: the browser is the system's ``/usr/bin/chromium``
(``apt-get install chromium``), launched with its network features off, and the
Python side is the ``playwright`` package alone (never ``playwright install``).

:class:`LabServer` starts ``python -m jupyterlab`` on a free loopback port with a
token, in a throw-away root and Jupyter config/data/runtime directories, and
stops it (kernels first) however the test ended. The page helpers act as a person
does: click a cell, press Shift+Enter, read what is on the screen.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]


def missing_browser_parts() -> str | None:
    """Why a browser test cannot run here, or None when it can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_notebook(path: Path, sources: list[str]) -> None:
    """A notebook of code cells bound to the ``python3`` kernel (so no kernel dialog)."""
    nb = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
        "cells": [
            {"cell_type": "code", "id": f"cell-{i}", "metadata": {}, "execution_count": None,
             "outputs": [], "source": src}
            for i, src in enumerate(sources)
        ],
    }
    path.write_text(json.dumps(nb, indent=1))


# JupyterLab settings that keep a test run quiet and offline: no news or update
# notifications, no "what's new" popups, no autosave races with our own notebook file.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}


class LabServer:
    """``python -m jupyterlab`` on 127.0.0.1, its own process group, token auth."""

    def __init__(self, workdir: Path, python: str = sys.executable, startup_timeout: float = 60):
        self.workdir = Path(workdir)
        self.root = self.workdir / "root"
        self.python = python
        self.startup_timeout = startup_timeout
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "jupyterlab.log"
        self.proc: subprocess.Popen | None = None
        self._family: dict[int, psutil.Process] = {}

    # ------------------------------------------------------------------ start
    def start(self) -> LabServer:
        self.root.mkdir(parents=True, exist_ok=True)
        jupyter = self.workdir / "jupyter"
        settings = jupyter / "lab-user-settings"
        for name, value in LAB_SETTINGS.items():
            plugin_dir, _, file = name.rpartition("/")
            (settings / plugin_dir).mkdir(parents=True, exist_ok=True)
            (settings / plugin_dir / file).write_text(json.dumps(value))
        env = dict(os.environ)
        env.update(
            JUPYTER_CONFIG_DIR=str(jupyter / "config"),
            JUPYTER_DATA_DIR=str(jupyter / "data"),
            JUPYTER_RUNTIME_DIR=str(jupyter / "runtime"),
            JUPYTER_PLATFORM_DIRS="1",
            PYTHONUNBUFFERED="1",
        )
        # The kernel is the venv's python (jupyter_client maps the "python" of the
        # python3 kernelspec to the server's sys.executable), so it imports cloudlab.
        cmd = [
            self.python, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
            f"--port={self.port}", "--port-retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}", "--allow-root",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={jupyter / 'workspaces'}",
            "--ServerApp.open_browser=False",
            "--ServerApp.shutdown_no_activity_timeout=600",  # a last resort if we are killed
            "--MappingKernelManager.cull_idle_timeout=0",
        ]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode} while "
                                   f"starting:\n{self.log_tail()}")
            try:
                status = self.api("GET", "/api/status", timeout=2)
                if "started" in status:
                    return self
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not answer /api/status within "
                                   f"{self.startup_timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 10):
        sep = "&" if "?" in path else "?"
        req = urllib.request.Request(f"{self.url}{path}{sep}token={self.token}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read()
        return json.loads(data) if data else None

    def lab_url(self, path: str) -> str:
        return f"{self.url}/lab/tree/{path}?token={self.token}"

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    # ------------------------------------------------------------------- stop
    def _remember_family(self) -> None:
        """The server and everything below it (kernels lead their own sessions)."""
        if self.proc is None:
            return
        with contextlib.suppress(psutil.Error):
            top = psutil.Process(self.proc.pid)
            for p in [top, *top.children(recursive=True)]:
                self._family[p.pid] = p

    def kernels(self) -> list[dict]:
        try:
            return self.api("GET", "/api/kernels", timeout=5) or []
        except (OSError, ValueError):
            return []

    def stop(self, timeout: float = 30) -> None:
        """Kernels first (so they stop their clusters), then the server; force if need be."""
        if self.proc is None:
            return
        self._remember_family()
        if self.proc.poll() is None:
            for k in self.kernels():
                with contextlib.suppress(OSError, ValueError):
                    self.api("DELETE", f"/api/kernels/{k['id']}", timeout=timeout)
            with contextlib.suppress(OSError, ValueError):
                self.api("POST", "/api/shutdown", timeout=5)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    self.proc.wait(10)
        self._signal_group(signal.SIGKILL)  # anything left in the server's group
        # Kernels run in sessions of their own: whatever of the family outlived the
        # server (it should not) is killed too.
        alive = [p for p in self._family.values() if _alive(p)]
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        self._log.close()

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


@contextlib.contextmanager
def lab_for_a_test(workdir: Path):
    """A started :class:`LabServer` with the venv's python (so kernels have cloudlab), or
    pytest's skip naming the missing part; on exit it is stopped and no cloudlab process
    may outlive it (any that does is killed, and the test fails)."""
    import pytest

    from conftest import wait_until_gone

    missing = missing_browser_parts()
    if missing:
        pytest.skip(f"browser test needs Debian chromium and Playwright: {missing}")
    server = LabServer(workdir, python=sys.executable)
    try:
        yield server.start()
    finally:
        server.stop()
        survivors = wait_until_gone(timeout=15)
        for p in survivors:
            with contextlib.suppress(psutil.Error):
                p.kill()
        assert survivors == [], ("cloudlab processes outlived the JupyterLab kernel: "
                                 f"{[p.cmdline() for p in survivors]}")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@contextlib.contextmanager
def chromium_page(user_data_dir: Path, viewport=(1280, 1000)):
    """A fresh, headless, offline-minded Debian chromium page (Playwright, sync API)."""
    from playwright.sync_api import sync_playwright

    user_data_dir.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(user_data_dir), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": viewport[0], "height": viewport[1]})
        try:
            context.set_default_timeout(30_000)
            page = context.pages[0] if context.pages else context.new_page()
            yield page
        finally:
            context.close()


# ---------------------------------------------------------------------------- page helpers
PROMPT_DONE = re.compile(r"^\[\d+\]:$")


def dismiss_popups(page) -> None:
    """Close what JupyterLab may put in front: a kernel dialog (accept the default
    kernel), toasts (news, updates)."""
    dialog = page.locator(".jp-Dialog")
    if dialog.count():
        accept = dialog.locator(".jp-Dialog-footer button.jp-mod-accept")
        if accept.count():
            accept.first.click()
        else:
            page.keyboard.press("Escape")
    for close in page.locator(".Toastify__toast .jp-toast-button, "
                              ".Toastify__close-button").all():
        with contextlib.suppress(Exception):
            close.click(timeout=1000)


def wait_kernel_ready(page, server: LabServer, timeout: float = 60) -> None:
    """Until the page is connected to an idle kernel: the server counts a connection to
    it and the notebook's execution indicator and status bar say idle. (The indicator
    alone says idle before the kernel is connected; Shift+Enter is then lost.)"""
    deadline = time.monotonic() + timeout
    indicator = page.locator(".jp-Notebook-ExecutionIndicator")
    state = {}
    while time.monotonic() < deadline:
        dismiss_popups(page)
        kernels = server.kernels()
        state = {
            "kernels": [(k.get("execution_state"), k.get("connections")) for k in kernels],
            "indicator": indicator.first.get_attribute("data-status") if indicator.count()
            else None,
            "status bar": page.locator(".jp-StatusBar-Widget").all_inner_texts(),
        }
        if (len(kernels) == 1 and kernels[0].get("execution_state") == "idle"
                and kernels[0].get("connections", 0) >= 1 and state["indicator"] == "idle"
                and any("| Idle" in t for t in state["status bar"])):
            return
        time.sleep(0.25)
    raise AssertionError(f"the notebook was not connected to an idle kernel within "
                         f"{timeout:.0f} s: {state}")


def cell(page, index: int):
    return page.locator(".jp-Notebook .jp-Cell").nth(index)


def run_cell(page, index: int, attempts: int = 3) -> None:
    """Select cell ``index`` the way a person does (a click on its prompt) and press
    Shift+Enter; returns once the cell is queued or running (``[*]:``) or done. A press
    that JupyterLab dropped (the prompt stays ``[ ]:``) is repeated."""
    c = cell(page, index)
    for _ in range(attempts):
        dismiss_popups(page)
        c.scroll_into_view_if_needed()
        c.locator(".jp-InputPrompt").click()
        page.keyboard.press("Shift+Enter")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if prompt(page, index) != "[ ]:":
                return
            time.sleep(0.1)
    raise AssertionError(f"cell {index} did not start after {attempts} x Shift+Enter "
                         f"(prompt {prompt(page, index)!r})")


def prompt(page, index: int) -> str:
    return cell(page, index).locator(".jp-InputArea-prompt").inner_text().strip()


def wait_cell_done(page, index: int, timeout: float) -> None:
    """Until cell ``index`` shows an execution count ``[n]:`` (not ``[*]:`` or ``[ ]:``)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = prompt(page, index)
        if PROMPT_DONE.match(text):
            return
        time.sleep(0.2)
    raise AssertionError(f"cell {index} did not finish within {timeout:.0f} s "
                         f"(prompt {text!r}); its output: {cell_output(page, index)!r}")


def cell_output(page, index: int) -> str:
    out = cell(page, index).locator(".jp-OutputArea")
    return out.inner_text() if out.count() else ""


def cell_errors(page, index: int) -> list[str]:
    errors = cell(page, index).locator(".jp-OutputArea-output[data-mime-type="
                                       "'application/vnd.jupyter.stderr']")
    return [e.inner_text() for e in errors.all() if "Traceback" in e.inner_text()
            or "Error" in e.inner_text()]


def poll(fn, timeout: float, interval: float = 0.25, what: str = "condition"):
    """``fn()`` until it returns something truthy; that value, or AssertionError."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not met within {timeout:.0f} s (last: {last!r})")


# ------------------------------------------------------------------ a whole notebook, as a person
# What a person sees of a notebook after running it, read in one go. Cells off screen are
# not painted (JupyterLab's windowing), so text is read with textContent, not innerText.
NOTEBOOK_SEEN = """() => {
  const cells = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell')];
  const text = (el) => el ? el.textContent.trim() : '';
  return cells.map(c => ({
    code: c.classList.contains('jp-CodeCell'),
    prompt: text(c.querySelector('.jp-InputArea-prompt')),
    hidden_input: !!c.querySelector('.jp-InputPlaceholder'),
    output: text(c.querySelector('.jp-OutputArea')),
    errors: [...c.querySelectorAll(
      ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")]
      .map(e => e.textContent).filter(t => t.includes('Traceback') || /\\w+Error\\b/.test(t)),
    images: [...c.querySelectorAll('.jp-OutputArea-output img')]
      .map(i => ({loaded: i.complete && i.naturalWidth > 0, width: i.naturalWidth})),
    broken_widgets: [...c.querySelectorAll('.jp-OutputArea-output')]
      .filter(o => /Error displaying widget|Loading widget\\.\\.\\./.test(o.textContent)).length,
    details: [...c.querySelectorAll('.jp-RenderedMarkdown details')]
      .map(d => ({open: d.open, summary: text(d.querySelector('summary'))})),
    headings: [...c.querySelectorAll('.jp-RenderedMarkdown h1, .jp-RenderedMarkdown h2')]
      .map(h => text(h).replace(/¶$/, '')),
  }));
}"""


def open_notebook(page, server: LabServer, name: str, cells: int) -> None:
    """Open ``name`` in the lab and wait until its ``cells`` cells show and its kernel is
    connected and idle."""
    page.goto(server.lab_url(name), wait_until="domcontentloaded", timeout=60_000)
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(state="visible", timeout=60_000)
    poll(lambda: page.locator(".jp-Notebook .jp-Cell").count() == cells, timeout=60,
         what=f"{name} showing its {cells} cells")
    wait_kernel_ready(page, server, timeout=60)


def menu(page, top: str, item: str) -> None:
    """Click ``top`` in the menu bar, then ``item`` in the menu that opens."""
    dismiss_popups(page)
    page.locator(".lm-MenuBar-item", has_text=top).first.click()
    page.locator(".lm-Menu-item:not(.lm-mod-disabled)",
                 has_text=re.compile(rf"^{re.escape(item)}")).first.click()


def run_all_cells(page, name: str, timeout: float) -> list[dict]:
    """Run > Run All Cells, then wait until every code cell shows its execution count. The
    first traceback on the page ends the wait (JupyterLab skips the cells after an error)."""
    menu(page, "Run", "Run All Cells")
    deadline = time.monotonic() + timeout
    while True:
        cells = page.evaluate(NOTEBOOK_SEEN)
        errors = [(i, e) for i, c in enumerate(cells) for e in c["errors"]]
        if errors:
            i, error = errors[0]
            raise AssertionError(f"{name}, cell {i}, raised:\n{error[-3000:]}")
        # (A cell whose input is collapsed shows no prompt; cells run in order, so the
        # prompts of the others tell when it ran.)
        code = [c for c in cells if c["code"] and not c["hidden_input"]]
        if code and all(PROMPT_DONE.match(c["prompt"]) for c in code):
            return cells
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} had not run to the end in {timeout:.0f} s: prompts "
                                 f"{[c['prompt'] for c in code]}")
        time.sleep(0.5)


def close_and_shut_down(page, server: LabServer, timeout: float = 30) -> None:
    """File > Close and Shut Down Notebook, accepted; until the server has no kernel."""
    menu(page, "File", "Close and Shut Down Notebook")
    # "Shut down the notebook?", then (outputs are changes) "Save your work?": accepted both.
    accept = page.locator(".jp-Dialog .jp-Dialog-footer button.jp-mod-accept")
    for _ in range(2):
        with contextlib.suppress(Exception):
            accept.first.click(timeout=3000)
    poll(lambda: server.kernels() == [], timeout=timeout, what="the notebook's kernel shut down")


def run_in_lab(lab: LabServer, page, name: str, failure_shot: Path,
               timeout: float = 300) -> list[dict]:
    """Open, Run All, read, close and shut down; ``failure_shot`` is taken if a step fails."""
    nb = json.loads((lab.root / name).read_text())
    t0 = time.monotonic()
    try:
        open_notebook(page, lab, name, cells=len(nb["cells"]))
        seen = run_all_cells(page, name, timeout)
        print(f"\n{name}: Run All Cells took {time.monotonic() - t0:.1f} s")
        close_and_shut_down(page, lab)
        return seen
    except BaseException:
        with contextlib.suppress(Exception):
            page.screenshot(path=str(failure_shot))
        print(f"\nfailure screenshot: {failure_shot}\nJupyterLab log:\n{lab.log_tail()}")
        raise


def check_what_an_attendee_sees(name: str, nb, seen: list[dict]) -> None:
    """Every code cell ran clean, plots drawn, widgets rendered, exercises with hidden
    solutions; ``nb`` is the notebook as nbformat reads it."""
    assert len(seen) == len(nb.cells)
    code = [c for c in seen if c["code"]]
    assert code and all(c["errors"] == [] for c in code)
    images = [i for c in seen for i in c["images"]]
    assert all(i["loaded"] and i["width"] > 200 for i in images), (name, images)
    assert sum(c["broken_widgets"] for c in seen) == 0, name
    headings = [h for c in seen for h in c["headings"]]
    assert any("Exercises" in h for h in headings), (name, headings)
    # The solutions are there but hidden: folded <details>, or collapsed code cells.
    folded = [d for c in seen for d in c["details"]]
    collapsed = [c for c in seen if c["hidden_input"]]
    hidden_in_file = [c for c in nb.cells
                      if c.metadata.get("jupyter", {}).get("source_hidden")]
    assert len(collapsed) == len(hidden_in_file), name
    assert folded or collapsed, f"{name} has no hidden solutions"
    assert all(not d["open"] and "Solution" in d["summary"] for d in folded), (name, folded)
    for c in collapsed:  # a hidden solution is still run: its result is on the page
        assert c["output"], c
