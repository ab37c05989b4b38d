"""Shared fixtures. Add new ones below as plain, independent fixtures."""

from __future__ import annotations

import browser
import pytest


@pytest.fixture
def jupyter_isolated(tmp_path, monkeypatch):
    """Jupyter/IPython dirs in tmp_path, so a user's own kernelspecs/startup files don't leak in."""
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        d = tmp_path / var.lower()
        d.mkdir()
        monkeypatch.setenv(var, str(d))
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def chromium_browser():
    """Debian Chromium via Playwright; skips (or fails when CI=true) if either is missing."""
    browser.require_browser()
    with browser.chromium() as b:
        yield b


@pytest.fixture
def lab_page(chromium_browser, request):
    """A fresh Chromium page; saves artifacts/failed-<test>.png if the test fails."""
    with browser.new_page(chromium_browser) as page:
        yield page
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            name = "failed-" + "".join(c if c.isalnum() else "_" for c in request.node.name)
            try:
                browser.screenshot(page, name)
            except Exception:  # noqa: BLE001 - best effort diagnostics
                pass


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
