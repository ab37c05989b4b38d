"""The wheel carries the embedded model: `tracer.load()` works from an installed wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# Build outputs and caches a working tree may hold. setuptools reuses an existing build/lib, so a
# wheel built in place would still carry files deleted from the source since (a moved module, say).
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "artifacts",
              ".hypothesis", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of the source tree without build outputs: what a clean clone builds.
    src = tmp_path_factory.mktemp("src") / "llama-tracer"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return next(out.glob("llama_tracer-*.whl"))


def test_wheel_contains_the_embedded_checkpoint(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    embedded = {n.split("/", 2)[-1] for n in names if n.startswith("tracer/embedded/")}
    for required in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                     "model.safetensors.index.json", "MODEL_CARD.md"):
        assert required in embedded, required
    assert len([n for n in embedded if n.endswith(".safetensors")]) >= 2
    assert "tracer/viz/widgets.py" in names and "tracer/cli.py" in names
    # Built at first use (tracer/kernels/build.py), headers included.
    assert {"tracer/kernels/matvec.c", "tracer/kernels/attend.c", "tracer/kernels/widen.h"} <= set(names)


def test_wheel_leaves_out_the_training_recipe_and_the_repo_tools(wheel):
    # The recipe (tools/train_tiny: corpus downloads, process-wide threads and seeds) is run from
    # a clone, never installed: the wheel holds the runtime package and its metadata only.
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if "train_tiny" in n]
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"tracer"}, top


def test_load_from_the_unpacked_wheel_not_the_source_tree(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = (
        "import tracer, pathlib\n"
        f"assert pathlib.Path(tracer.__file__).is_relative_to({str(site)!r}), tracer.__file__\n"
        "llm = tracer.load(device='cpu', progress=False)\n"
        "print(llm.load_trace.meta['matvec'])\n"
        "print(llm.generate('It is a truth universally', max_new_tokens=3, do_sample=False).text)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    from tracer import kernels

    # The kernel's source ships in the wheel and builds from there (into $HOME/.cache).
    assert proc.stdout.splitlines()[0] == ("kernel" if kernels.library().available else "torch")
