"""tracer.walkthrough: every stage has its transformers counterpart, and every name is real."""

from __future__ import annotations

import functools
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from tracer.trace import STAGES
from tracer.walkthrough import IN_TRANSFORMERS, TransformersRef

ROOT = Path(__file__).resolve().parent.parent
REFS = [ref for refs in IN_TRANSFORMERS.values() for ref in refs]


def test_every_stage_has_a_note():
    assert list(IN_TRANSFORMERS) == list(STAGES)  # every stage, in the walkthrough's order
    for stage, refs in IN_TRANSFORMERS.items():
        assert refs, f"{stage}: no transformers reference"
        for ref in refs:
            assert isinstance(ref, TransformersRef)
            assert ref.module.startswith("transformers.") and ref.qualname and ref.note
            assert "\n" not in ref.note and len(ref.note) < 120, f"{ref.name}: the note is one short line"


def test_the_table_never_imports_transformers():
    code = "import sys, tracer.walkthrough; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("ref", REFS, ids=[r.name for r in REFS])
def test_every_reference_resolves_in_the_installed_transformers(ref: TransformersRef):
    pytest.importorskip("transformers")
    module = importlib.import_module(ref.module)
    obj = functools.reduce(getattr, ref.qualname.split("."), module)
    obj = inspect.unwrap(obj)  # decorators (deprecate_kwarg, no_grad) would point at their own file
    assert obj.__qualname__ == ref.qualname
    assert inspect.getsourcefile(obj) == inspect.getsourcefile(module)  # defined there, not re-exported
    assert inspect.getsourcelines(obj)[1] > 0
