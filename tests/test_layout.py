"""The house's layout: lower layers never import higher ones, the README names every module,
no function grows past what a reader takes in at once, and transformers stays a test oracle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tracer"

# The layers, bottom first. A module may import its own layer and those below; never above. The
# walkthrough's reading order (README "Layout") follows the same order, with the speed machinery
# (fast, matvec, attend, kernels) as a side wing above the model that the model does not know.
LAYERS = [
    {"errors", "dtypes", "knobs"},
    {"config", "hooks", "sampling", "catalog", "chat_template", "safetensors_file", "gguf_blocks"},
    {"resolution", "gguf_file", "tokenizer"},
    {"checkpoint", "gguf_tokenizer", "model"},
    {"trace"},  # events are built from the reports they describe (checkpoint's ShardReport)
    {"kernels", "matvec", "attend", "quant", "requant", "fast"},
    {"recorders", "generate"},
    {"api"},
    {"cli", "walkthrough", "viz", "__init__", "__main__"},
]
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    """Top-level module or package name -> its files."""
    out: dict[str, list[Path]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        out.setdefault(rel.parts[0].removesuffix(".py"), []).append(path)
    return out


def layer_of(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"tracer/{name} is in no layer of tests/test_layout.py LAYERS: place it")


def imported_modules(path: Path) -> set[str]:
    """The tracer modules ``path`` imports (relative imports, and ``tracer.x`` absolute ones)."""
    rel = path.relative_to(PACKAGE)
    depth = len(rel.parts) - 1  # how deep below tracer/ the file sits
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level <= depth:  # inside its own package
                    continue
                parts = (node.module or "").split(".")
                if node.module:
                    found.add(parts[0])
                else:
                    found.update(a.name for a in node.names)
            elif node.module and node.module.split(".")[0] == "tracer":
                found.add(node.module.split(".")[1] if "." in node.module else "__init__")
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("tracer."))
    return found


def test_every_module_is_placed_in_a_layer():
    for name in modules():
        layer_of(name)


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_imports_a_higher_layer(name):
    mine = layer_of(name)
    for path in modules()[name]:
        for other in imported_modules(path) - {name}:
            assert layer_of(other) <= mine, (
                f"{path.relative_to(ROOT)} imports tracer.{other} (layer {layer_of(other)}) from layer {mine}")


def test_the_model_knows_nothing_of_the_speed_machinery_or_capture():
    text = (PACKAGE / "model.py").read_text()
    code = re.sub(r'""".*?"""|#.*', "", text, flags=re.S)
    for word in ("kernel", "compile", "capture", "matvec", "fast"):
        assert word not in code.lower(), f"tracer/model.py mentions {word!r}"


def test_the_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    for name, paths in modules().items():
        if name in {"__init__", "__main__"}:
            continue
        shown = f"{name}/" if paths[0].parent != PACKAGE else f"{name}.py"
        assert shown in layout, f"README's Layout does not name tracer/{shown}"


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions past the limit:\n" + "\n".join(long)


def test_transformers_is_never_imported_by_the_runtime():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "transformers" for n in names), path
