"""Real-browser tests: JupyterLab in headless Debian Chromium, driven by Playwright.

The harness (tests/browser.py) is proved first against a tiny stepper notebook built at test
time; then every notebook of the reading order is run the way a reader would (Run All, on a
1440 x 900 screen) and must show no error; the stepper (05) is then clicked on the real model:
Next within the latency goal, the panels in view, Branch rendering both branches.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import browser
import nbformat
import pytest

from tracer.viz.widgets import NO_STEP

pytestmark = pytest.mark.browser

STEP_NB = "05_step_by_step.ipynb"
PNG_SRC = "data:image/png;base64,"
SCREEN = (1440, 900)  # the screen the lessons are checked on
NEXT_LATENCY_MS = 1000  # a click on Next shows the new token and its panels within this
LATENCY_CLICKS = 5  # clicks timed; the median is held to the goal (one may meet a busy machine)

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
    """The step the header names; -1 before the first (steps count from 0, as in the trace)."""
    loc = panel.locator(".tracer-step-count")
    if loc.count() == 0:
        return None
    text = loc.first.inner_text()
    if text.strip() == NO_STEP:
        return -1
    m = re.search(r"step\s*(\d+)", text)
    assert m, f"tracer-step-count does not read 'step N': {text!r}"
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


# --------------------------------------------------------------------------- every notebook

# Installed in the page before a click: the click's time, then when the text gains a token span
# and when the panels' new image has loaded (performance.now(), ms).
WATCH_NEXT = """stepper => {
  const text = stepper.querySelector('.tracer-text'), plot = stepper.querySelector('.tracer-dist-plot');
  const n0 = text.querySelectorAll('.tracer-token').length;
  const src0 = (plot.querySelector('img') || {}).src;
  const r = window.__tracerClick = {t0: null, token: null, image: null};
  stepper.querySelector('button.tracer-next').addEventListener(
    'click', () => { r.t0 = performance.now(); }, {capture: true, once: true});
  const seen = new WeakSet();
  const check = () => {
    if (r.token === null && text.querySelectorAll('.tracer-token').length > n0) r.token = performance.now();
    const img = plot.querySelector('img');
    if (img && img.src !== src0 && !seen.has(img)) {
      seen.add(img);
      if (img.complete) r.image = performance.now();
      else img.addEventListener('load', () => { r.image = performance.now(); }, {once: true});
    }
  };
  new MutationObserver(check).observe(stepper, {subtree: true, childList: true, attributes: true,
                                                characterData: true});
}"""


def time_next_click(page, stepper) -> tuple[float, float]:
    """Click Next once; (ms to the new token's span, ms to the panels' new image), browser clock."""
    stepper.evaluate(WATCH_NEXT)
    stepper.locator("button.tracer-next").click()
    page.wait_for_function("() => { const r = window.__tracerClick; "
                           "return r.t0 !== null && r.token !== null && r.image !== null; }", timeout=60_000)
    r = page.evaluate("() => window.__tracerClick")
    return r["token"] - r["t0"], r["image"] - r["t0"]


def in_view(page, locator) -> bool:
    """The element lies wholly inside the notebook's visible scroll area."""
    return page.evaluate(
        """el => { const s = el.closest('.jp-WindowedPanel-outer') || document.documentElement;
                   const a = el.getBoundingClientRect(), v = s.getBoundingClientRect();
                   return a.height > 0 && a.top >= v.top - 1 && a.bottom <= v.bottom + 1; }""",
        locator.element_handle())


def check_stepper(page, panel) -> None:
    """The real-model stepper: Branch waits for a step; Next is timed and keeps the panels in
    view; Branch renders both branches."""
    from playwright.sync_api import expect

    stepper = panel.locator(".tracer-stepper").first
    nxt, branch = stepper.locator("button.tracer-next"), stepper.locator("button.tracer-branch")
    expect(nxt).to_be_enabled(timeout=120_000)
    expect(branch).to_be_disabled()  # nothing to branch from before the first step
    stepper.evaluate("el => el.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(300)
    timings = []
    for _ in range(LATENCY_CLICKS):
        timings.append(time_next_click(page, stepper))
        expect(nxt).to_be_enabled(timeout=60_000)
    tokens_ms, images_ms = zip(*timings, strict=True)
    print(f"\nNext on the real model, click -> new token span (ms): {[round(t) for t in tokens_ms]}; "
          f"-> new panel image loaded (ms): {[round(t) for t in images_ms]}; "
          f"median {statistics.median(tokens_ms):.0f} / {statistics.median(images_ms):.0f}")
    assert statistics.median(images_ms) <= NEXT_LATENCY_MS, timings
    assert statistics.median(tokens_ms) <= NEXT_LATENCY_MS, timings
    expect(stepper.locator(".tracer-step-count")).to_have_text(f"step {LATENCY_CLICKS - 1}")
    expect(stepper.locator(".tracer-text .tracer-token")).to_have_count(LATENCY_CLICKS)
    assert in_view(page, stepper.locator(".tracer-dist-plot img")), "the panels left the screen after a click"
    assert in_view(page, nxt), "Next left the screen after a click"
    cut = stepper.evaluate("""el => [...el.querySelectorAll('.widget-label, .widget-label-basic, select')]
        .filter(x => x.offsetParent && x.scrollWidth > x.clientWidth + 1).map(x => x.innerText || x.value)""")
    assert not cut, f"labels cut at the notebook's width: {cut}"
    browser.screenshot(page, "05_stepper_after_next")  # the screen as a reader sees it

    expect(branch).to_be_enabled()
    branch.click()
    compare = stepper.locator(".tracer-compare-text")
    expect(compare.locator("td")).to_have_count(2, timeout=60_000)
    for column in compare.locator("td").all():
        assert column.locator(".tracer-cmp-token").count() > 0, column.inner_text()
    expect(stepper.locator(".tracer-compare-plot img")).to_have_attribute(
        "src", re.compile("^" + re.escape(PNG_SRC)), timeout=60_000)
    expect(stepper.locator(".tracer-step-count")).to_contain_text(re.compile(r"^step \d+$"))
    assert not stepper.locator(".tracer-error").inner_text().strip()
    stepper.locator(".tracer-compare-plot").evaluate("el => el.scrollIntoView({block: 'end'})")
    page.wait_for_timeout(300)
    browser.screenshot(page, "05_stepper_after_branch")


@pytest.mark.slow
@pytest.mark.parametrize("name", browser.READING_ORDER)
def test_notebook_in_the_browser(name, chromium_browser):
    """Run All shows no error; the stepper is clicked on the real model. A missing notebook fails."""
    path = browser.NOTEBOOK_DIR / name
    assert path.is_file(), f"{path.relative_to(browser.REPO_ROOT)} is in READING_ORDER but missing"
    with browser.new_page(chromium_browser, *SCREEN) as page, browser.jupyter_lab([path]) as lab:
        try:
            panel = browser.open_notebook(page, lab, name)
            browser.run_all_cells(page, panel)
            assert_clean(page, panel)
            browser.screenshot(page, path.stem, panel)
            if name == STEP_NB:
                check_stepper(page, panel)
                assert_clean(page, panel)
        except Exception:
            browser.screenshot(page, f"failed-{path.stem}")
            raise
