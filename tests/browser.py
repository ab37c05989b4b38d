"""Reusable harness: JupyterLab on loopback, driven by Playwright in Debian's Chromium.

Not a test module. Use it from tests as::

    with jupyter_lab([nb_path]) as lab, chromium_page() as page:
        panel = open_notebook(page, lab, nb_path.name)
        run_all_cells(page, panel)
        screenshot(page, panel, "name")

or through the ``lab_page`` fixture in ``conftest.py`` (which also skips/fails cleanly when the
browser is missing: see :func:`require_browser`).

What the server gets: 127.0.0.1, a free port, a random token, a temp root dir holding copies of
the given notebooks, temp JUPYTER_CONFIG_DIR / JUPYTER_DATA_DIR / JUPYTER_RUNTIME_DIR / IPYTHONDIR,
the news popup off and notebook windowing off (every cell in the DOM, so selectors and full-height
screenshots see the whole notebook). Stopped with POST /api/shutdown.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # pragma: no cover
    from playwright.sync_api import Browser, Locator, Page

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
# The lessons in their reading order (README's layout lists them too). Tests run exactly these: a
# renamed or missing notebook fails them instead of being skipped.
READING_ORDER = (
    "01_loading.ipynb",
    "02_walkthrough.ipynb",
    "03_tokenizer.ipynb",
    "04_prefill_and_attention.ipynb",
    "05_step_by_step.ipynb",
    "06_trace_explorer.ipynb",
    "07_quantization.ipynb",
)
ARTIFACTS = Path(os.environ.get("TRACER_ARTIFACTS", REPO_ROOT / "artifacts"))
CHROMIUM = Path(os.environ.get("TRACER_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KERNEL_IDLE = re.compile(r"Python 3 \(ipykernel\) \| Idle")
STDERR_OUTPUT = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
WIDGET_ERROR_TEXT = "Error displaying widget"

# User settings written into the temp JUPYTER_CONFIG_DIR.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require_browser() -> None:
    """Skip (locally) or fail (CI=true) when Chromium or the playwright package is missing."""
    missing = []
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"{CHROMIUM} (apt-get install -y --no-install-recommends chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package (pip install -e '.[test]')")
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if in_ci():
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)


# ---------------------------------------------------------------------------- JupyterLab server


@dataclass
class JupyterLab:
    base_url: str
    token: str
    root: Path
    proc: subprocess.Popen
    log_path: Path
    env: dict = field(repr=False, default_factory=dict)

    def url(self, path: str) -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base_url}{path}{sep}token={self.token}"

    def notebook_url(self, name: str) -> str:
        # ?reset: a clean workspace holding only this notebook (no restored tabs or kernels)
        return self.url(f"/lab/tree/{urllib.request.quote(name)}?reset")

    def api(self, path: str, method: str = "GET", timeout: float = 5.0) -> int:
        req = urllib.request.Request(
            self.base_url + path,
            method=method,
            headers={"Authorization": f"token {self.token}"},
            data=b"" if method == "POST" else None,
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_lab_settings(config_dir: Path) -> None:
    for plugin, values in LAB_SETTINGS.items():
        pkg, name = plugin.rsplit("/", 1)
        target = config_dir / "lab" / "user-settings" / pkg / f"{name}.jupyterlab-settings"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(values))


@contextmanager
def jupyter_lab(
    notebooks: Iterable[Path | str] = (), *, startup_timeout: float = 90.0
) -> Iterator[JupyterLab]:
    """Start JupyterLab on a temp root holding copies of ``notebooks``; stop it afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="tracer-lab-"))
    root = tmp / "root"
    root.mkdir()
    for nb in notebooks:
        shutil.copy2(nb, root / Path(nb).name)
    env = dict(os.environ)
    for var, sub in [
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_DATA_DIR", "data"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("IPYTHONDIR", "ipython"),
    ]:
        (tmp / sub).mkdir()
        env[var] = str(tmp / sub)
    env.pop("JUPYTER_PATH", None)
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    _write_lab_settings(tmp / "config")

    port, token = free_port(), secrets.token_hex(16)
    cmd = [
        sys.executable, "-m", "jupyterlab", "--no-browser",
        "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]  # fmt: skip
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log_path = tmp / "jupyterlab.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    lab = JupyterLab(f"http://127.0.0.1:{port}", token, root, proc, log_path, env)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {proc.returncode}:\n{lab.log_tail()}")
            try:
                if lab.api("/api/status", timeout=2) == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab not ready in {startup_timeout}s:\n{lab.log_tail()}")
            time.sleep(0.25)
        yield lab
    finally:
        _stop(lab)
        shutil.rmtree(tmp, ignore_errors=True)


def _stop(lab: JupyterLab) -> None:
    if lab.proc.poll() is None:
        try:
            lab.api("/api/shutdown", method="POST")
        except OSError:
            pass
        try:
            lab.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            lab.proc.kill()  # only the server we started
            lab.proc.wait(timeout=10)


# ------------------------------------------------------------------------------- Chromium pages


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian Chromium, headless, launched by Playwright (never `playwright install`)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def new_page(browser: Browser, width: int = 1400, height: int = 1000) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.console_errors = []  # type: ignore[attr-defined]
    page.on(
        "console",
        lambda m: m.type == "error" and page.console_errors.append(m.text),  # type: ignore[attr-defined]
    )
    try:
        yield page
    finally:
        context.close()


@contextmanager
def chromium_page(width: int = 1400, height: int = 1000) -> Iterator[Page]:
    with chromium() as browser, new_page(browser, width, height) as page:
        yield page


# --------------------------------------------------------------------------- notebook helpers


def wait_kernel_idle(page: Page, timeout: float = 120.0) -> None:
    """Kernel really ready: the status bar reads ``Python 3 (ipykernel) | Idle``.

    (The execution indicator's data-status turns idle about a second too early.)
    """
    page.locator(".jp-StatusBar-TextItem", has_text=KERNEL_IDLE).first.wait_for(
        state="visible", timeout=timeout * 1000
    )


def open_notebook(page: Page, lab: JupyterLab, name: str, timeout: float = 120.0) -> Locator:
    """Open ``name`` (relative to the lab root), wait for the kernel; return the notebook panel."""
    page.goto(lab.notebook_url(name))
    panel = page.locator(".jp-NotebookPanel:visible").first
    panel.wait_for(state="visible", timeout=timeout * 1000)
    page.locator(".lm-TabBar-tab.lm-mod-current", has_text=name).first.wait_for(
        timeout=timeout * 1000
    )
    panel.locator(".jp-KernelName", has_text="Python 3").first.wait_for(timeout=timeout * 1000)
    wait_kernel_idle(page, timeout)
    return panel


def _prompts(panel: Locator) -> list[str]:
    return [t.strip() for t in panel.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()]


def run_all_cells(page: Page, panel: Locator, timeout: float = 600.0) -> None:
    """Run menu -> "Run All Cells"; return once no cell is queued/running and the kernel is idle.

    Also returns when run-all stopped at an error (later cells stay ``[ ]:``); check outputs
    with :func:`page_problems` / error outputs afterwards.
    """
    deadline = time.monotonic() + timeout
    started, clicked_at, attempts = False, 0.0, 0
    while True:
        if not started and time.monotonic() - clicked_at > 10:
            # Nothing queued 10 s after a click means the click was lost (a known trap when
            # the kernel only just came up): queued cells show [*] at once, so retrying is safe.
            if attempts == 3:
                raise TimeoutError(f"Run All Cells did nothing after {attempts} tries")
            if attempts:
                print(f"run_all_cells: Run All Cells did nothing; clicking again ({attempts})")
            panel.click(position={"x": 5, "y": 5})  # this notebook is the current widget
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
            clicked_at, attempts = time.monotonic(), attempts + 1
        prompts = _prompts(panel)
        running = any("*" in p for p in prompts)
        started = started or running or any(re.search(r"\[\d+\]", p) for p in prompts)
        idle = page.locator(".jp-StatusBar-TextItem", has_text=KERNEL_IDLE).count() > 0
        if started and not running and idle:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"run all cells did not finish in {timeout}s; prompts: {prompts}")
        time.sleep(0.25)
    page.wait_for_timeout(500)  # let widget views and images render


def page_problems(page: Page, scope: Locator | None = None) -> list[str]:
    """Visible failures: "Error displaying widget" text, stderr outputs, error outputs."""
    where = scope if scope is not None else page.locator("body")
    problems = []
    if WIDGET_ERROR_TEXT in where.inner_text():
        problems.append(f'"{WIDGET_ERROR_TEXT}" shown')
    for text in where.locator(STDERR_OUTPUT).all_inner_texts():
        problems.append("stderr output: " + text.strip()[:2000])
    return problems


def screenshot(
    page: Page, name: str, panel: Locator | None = None, max_height: int = 16000
) -> Path:
    """Save ``artifacts/<name>.png``; with ``panel``, the viewport grows to show the whole notebook.

    JupyterLab is a fixed-height app whose notebook scrolls inside a panel, so a plain
    full-page screenshot would only show one screen of it.
    """
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    size = page.viewport_size or {"width": 1400, "height": 1000}
    grown = False
    if panel is not None:
        extra = panel.evaluate(
            """p => { const s = p.querySelector('.jp-WindowedPanel-outer') || p;
                      return s.scrollHeight - s.clientHeight; }"""
        )
        if extra > 0:
            page.set_viewport_size(
                {"width": size["width"], "height": min(size["height"] + extra + 50, max_height)}
            )
            page.wait_for_timeout(700)
            grown = True
        # From the top: after Run All the notebook is scrolled to its last cell.
        panel.evaluate("p => { (p.querySelector('.jp-WindowedPanel-outer') || p).scrollTop = 0; }")
        page.wait_for_timeout(100)
    page.screenshot(path=str(path), full_page=True)
    if grown:
        page.set_viewport_size(size)
    return path
