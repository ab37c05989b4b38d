"""Every notebooks/*.ipynb runs headless (nbclient) without errors, and is shipped clean."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from browser import NOTEBOOK_DIR, READING_ORDER

NOTEBOOKS = [NOTEBOOK_DIR / name for name in READING_ORDER]
CELL_TIMEOUT = 600
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_the_notebook_folder_holds_exactly_the_lessons():
    """A new, renamed or missing notebook must be added to READING_ORDER (and so to the tests)."""
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(READING_ORDER)


def output_problems(nb) -> list[str]:
    """Error outputs, and stderr streams carrying a traceback or an error (widget callbacks)."""
    problems = []
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.output_type == "error":
                tb = ANSI.sub("", "\n".join(out.get("traceback", [])))
                problems.append(f"cell {index}: {out.ename}: {out.evalue}\n{tb}")
            elif out.output_type == "stream" and out.name == "stderr":
                text = out.text if isinstance(out.text, str) else "".join(out.text)
                if "Traceback" in text or "Error" in text:
                    problems.append(f"cell {index}: stderr:\n{text}")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=READING_ORDER)
def test_notebook_runs_headless(path: Path, jupyter_isolated):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        allow_errors=True,  # run every cell, then report all problems with their cell index
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()
    problems = output_problems(nb)
    assert not problems, f"{path.name}:\n" + "\n\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=READING_ORDER)
def test_notebook_shipped_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    dirty = [
        f"cell {i}: {len(c.get('outputs', []))} output(s), execution_count={c.get('execution_count')}"
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name} is shipped with outputs (clear them):\n" + "\n".join(dirty)


def test_output_problems_catches_errors_and_stderr_tracebacks():
    """The checker itself: error outputs and stderr tracebacks are caught, warnings are not."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("x", outputs=[nbformat.v4.new_output(
            "error", ename="ValueError", evalue="bad", traceback=["tb"])]),
        nbformat.v4.new_code_cell("y", outputs=[nbformat.v4.new_output(
            "stream", name="stderr", text="Traceback (most recent call last):\n")]),
        nbformat.v4.new_code_cell("z", outputs=[nbformat.v4.new_output(
            "stream", name="stderr", text="UserWarning: fine\n")]),
    ]  # fmt: skip
    problems = output_problems(nb)
    assert len(problems) == 2
    assert problems[0].startswith("cell 0: ValueError: bad")
    assert problems[1].startswith("cell 1: stderr")
