"""Real-browser tests: JupyterLab in headless Debian Chromium, driven by Playwright.

The harness (tests/browser.py) is proved first against a tiny stepper notebook built at test
time; then the project's notebooks are run the way a reader would: Run All, then the buttons.
"""

from __future__ import annotations

import re
from pathlib import Path

import browser
import nbformat
import pytest

pytestmark = pytest.mark.browser

NOTEBOOKS = browser.REPO_ROOT / "notebooks"
STEP_NB = NOTEBOOKS / "05_step_by_step.ipynb"
ATTENTION_NB = NOTEBOOKS / "04_prefill_and_attention.ipynb"
PNG_SRC = "data:image/png;base64,"

# A minimal stand-in for 05_step_by_step: same CSS classes, same interaction.
TINY_STEPPER = """\
import ipywidgets as W
import matplotlib.pyplot as plt
from IPython.display import display

words = ["It", " is", " a", " truth", " universally", " acknowledged", "."]
state = {"step": 0}
text = W.HTML("<span class='tracer-token'>Prompt</span>").add_class("tracer-text")
count = W.Label("step 0").add_class("tracer-step-count")
plot = W.Output().add_class("tracer-dist-plot")
button = W.Button(description="Next token").add_class("tracer-next")

def draw():
    fig, ax = plt.subplots(figsize=(4, 2))
    ax.bar(range(5), [(state["step"] * 7 + i * 3) % 5 + 1 for i in range(5)])
    ax.set_title(f"step {state['step']}")
    with plot:
        plot.clear_output(wait=True)
        display(fig)
    plt.close(fig)

def on_next(_):
    state["step"] += 1
    tok = words[state["step"] % len(words)]
    text.value += f"<span class='tracer-token'>{tok}</span>"
    count.value = f"step {state['step']}"
    draw()

button.on_click(on_next)
draw()
display(W.VBox([button, count, text, plot]))
"""


def _notebook(path: Path, *code_cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}  # fmt: skip
    nb.cells = [nbformat.v4.new_markdown_cell("# harness self-test")]
    nb.cells += [nbformat.v4.new_code_cell(src) for src in code_cells]
    nbformat.write(nb, path)
    return path


def _step_number(panel) -> int | None:
    loc = panel.locator(".tracer-step-count")
    if loc.count() == 0:
        return None
    m = re.search(r"step\s*(\d+)", loc.first.inner_text())
    assert m, f"tracer-step-count does not read 'step N': {loc.first.inner_text()!r}"
    return int(m.group(1))


def click_next_and_check(page, panel, clicks: int = 3) -> None:
    """Click `.tracer-next` ``clicks`` times; the text, step count and plot must follow."""
    from playwright.sync_api import expect

    button = panel.locator("button.tracer-next").first
    text = panel.locator(".tracer-text").first
    tokens = panel.locator(".tracer-text .tracer-token")
    img = panel.locator(".tracer-dist-plot img").first
    expect(button).to_be_enabled(timeout=120_000)
    expect(img).to_have_attribute("src", re.compile("^" + re.escape(PNG_SRC)))

    n0, step0, src0 = tokens.count(), _step_number(panel), img.get_attribute("src")
    for i in range(1, clicks + 1):
        button.click()
        expect(tokens).to_have_count(n0 + i, timeout=120_000)  # one token per click, no more
        expect(button).to_be_enabled(timeout=120_000)
    page.wait_for_timeout(300)
    expect(tokens).to_have_count(n0 + clicks)

    visible = text.inner_text()
    for tok in tokens.all_inner_texts()[n0:]:
        assert tok.strip() and tok.strip() in visible, (tok, visible)
    if step0 is not None:
        expect(panel.locator(".tracer-step-count").first).to_contain_text(
            re.compile(rf"step\s*{step0 + clicks}\b")
        )
    expect(img).not_to_have_attribute("src", src0 or "", timeout=60_000)
    assert (img.get_attribute("src") or "").startswith(PNG_SRC)


def assert_clean(page, panel) -> None:
    problems = browser.page_problems(page, panel)
    assert not problems, "\n".join(problems)
    assert browser.WIDGET_ERROR_TEXT not in page.locator("body").inner_text()


def test_harness_self_test(tmp_path, lab_page):
    """The harness itself: start lab, open, run all, click, detect stderr, screenshot."""
    good = _notebook(tmp_path / "tiny_stepper.ipynb", TINY_STEPPER)
    bad = _notebook(
        tmp_path / "tiny_broken.ipynb",
        "import sys\nprint('Traceback (most recent call last): boom', file=sys.stderr)",
        "1 / 0",
        "print('never', 'runs')  # run-all stops at the error above",
    )
    with browser.jupyter_lab([good, bad]) as lab:
        assert lab.api("/api/status") == 200
        panel = browser.open_notebook(lab_page, lab, good.name)
        browser.run_all_cells(lab_page, panel)
        click_next_and_check(lab_page, panel, clicks=3)
        assert_clean(lab_page, panel)
        shot = browser.screenshot(lab_page, "harness_self_test", panel)
        assert shot.stat().st_size > 10_000

        # The checker is not vacuous: stderr and error outputs are reported,
        # and run_all_cells returns when run-all stops at an error.
        panel = browser.open_notebook(lab_page, lab, bad.name)
        browser.run_all_cells(lab_page, panel, timeout=120)
        problems = browser.page_problems(lab_page, panel)
        assert any("boom" in p for p in problems), problems
        assert any("ZeroDivisionError" in p for p in problems), problems
        assert "never runs" not in " ".join(panel.locator(".jp-OutputArea").all_inner_texts())
    assert lab.proc.poll() is not None, "JupyterLab still running after the context exited"


@pytest.mark.slow
def test_step_by_step_notebook(lab_page):
    if not STEP_NB.exists():
        pytest.skip(f"{STEP_NB.relative_to(browser.REPO_ROOT)} does not exist yet")
    with browser.jupyter_lab([STEP_NB]) as lab:
        panel = browser.open_notebook(lab_page, lab, STEP_NB.name)
        browser.run_all_cells(lab_page, panel)
        assert_clean(lab_page, panel)
        click_next_and_check(lab_page, panel, clicks=3)
        assert_clean(lab_page, panel)
        browser.screenshot(lab_page, STEP_NB.stem, panel)


@pytest.mark.slow
def test_attention_notebook_screenshot(lab_page):
    if not ATTENTION_NB.exists():
        pytest.skip(f"{ATTENTION_NB.relative_to(browser.REPO_ROOT)} does not exist yet")
    with browser.jupyter_lab([ATTENTION_NB]) as lab:
        panel = browser.open_notebook(lab_page, lab, ATTENTION_NB.name)
        browser.run_all_cells(lab_page, panel)
        assert_clean(lab_page, panel)
        browser.screenshot(lab_page, ATTENTION_NB.stem, panel)
