"""The training recipe (tools/train_tiny) lives outside the runtime package and still works.

The full recipe downloads its corpus and trains for half an hour, so it is not run here. Instead
a smoke run (the recipe's own command line on a 4 KB local text, a tiny model, a few steps, no
downloads) is compared with numbers the same command produced before the recipe moved out of
``tracer/``, and the recipe's defaults are checked against the shipped model's config and log.

smoke_reference.json was written by this file's ``__main__`` (see the bottom) from a run of
the recipe; rewrite it only when the recipe changes on purpose.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tracer
from tools.train_tiny.export import read_log_csv
from tools.train_tiny.train import TrainSettings, lr_at

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "tools" / "train_tiny"
MODULE = "tools.train_tiny"
SMOKE_TEXT = RECIPE / "smoke.txt"
REFERENCE = RECIPE / "smoke_reference.json"
# Steps 12 with the tiny model's eval_every of 5: log rows at steps 5, 10 and 12.
SMOKE_ARGS = ("--tiny", "--steps", "12", "--no-card")
# The same machine and torch give the same losses bit for bit; another CPU may round matmuls
# differently in the last bits. Any change to the recipe (seed, data order, schedule, model)
# moves the losses by far more than this.
LOSS_TOLERANCE = 1e-4
SUMMARY_KEYS = ("final_train_loss", "final_heldout_loss", "unigram_heldout_loss", "num_parameters",
                "tokens_seen", "epochs")
CORPUS_KEYS = ("train_paragraphs", "heldout_paragraphs", "train_tokens", "heldout_tokens",
               "heldout_scored_tokens")


def smoke_numbers(module: str, text: Path, tmp: Path) -> dict:
    """Runs ``python -m module`` on ``text`` with SMOKE_ARGS; the numbers it produced."""
    work, out = tmp / "work", tmp / "out"
    proc = subprocess.run(
        [sys.executable, "-m", module, "--text-file", str(text), *SMOKE_ARGS,
         "--workdir", str(work), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((work / "run_summary.json").read_text(encoding="utf-8"))
    with open(out / "training_log.csv", newline="", encoding="utf-8") as f:
        # Wall time ("seconds") is the one column that is not reproducible.
        log = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]
    return {
        "command": [module, "--text-file", text.name, *SMOKE_ARGS],
        "settings": summary["settings"],
        **{k: summary[k] for k in SUMMARY_KEYS},
        "corpus": {k: summary["corpus"][k] for k in CORPUS_KEYS},
        "log": log,
    }


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    return smoke_numbers(MODULE, SMOKE_TEXT, tmp_path_factory.mktemp("smoke"))


def test_smoke_run_reproduces_the_reference(smoke):
    ref = json.loads(REFERENCE.read_text(encoding="utf-8"))
    assert smoke["settings"] == ref["settings"]
    assert smoke["corpus"] == ref["corpus"], "same text, same tokenizer, same token streams"
    for key in ("num_parameters", "tokens_seen"):
        assert smoke[key] == ref[key], key
    for key in ("final_train_loss", "final_heldout_loss", "unigram_heldout_loss", "epochs"):
        assert smoke[key] == pytest.approx(ref[key], abs=LOSS_TOLERANCE), key
    assert [r["step"] for r in smoke["log"]] == [r["step"] for r in ref["log"]] == ["5", "10", "12"]
    for got, want in zip(smoke["log"], ref["log"], strict=True):
        assert got["lr"] == want["lr"], got["step"]
        for col in ("train_loss", "heldout_loss"):
            assert float(got[col]) == pytest.approx(float(want[col]), abs=LOSS_TOLERANCE), (got["step"], col)
    # The run learned something: held-out loss fell from the first log row to the last.
    assert float(smoke["log"][-1]["heldout_loss"]) < float(smoke["log"][0]["heldout_loss"])


def test_recipe_defaults_are_the_shipped_model():
    # The recipe's default settings are what made tracer/embedded/: same shape, same number of
    # steps and evaluations, and the learning-rate schedule reproduces the shipped log's lr column.
    embedded = tracer.embedded_path()
    settings = TrainSettings()
    cfg = json.loads((embedded / "config.json").read_text(encoding="utf-8"))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                "tie_word_embeddings"):
        assert cfg[key] == getattr(settings, key), key
    with open(embedded / "training_log.csv", newline="", encoding="utf-8") as f:
        shipped_lr = [row["lr"] for row in csv.DictReader(f)]
    log = read_log_csv(embedded / "training_log.csv")
    assert [r["step"] for r in log] == list(range(settings.eval_every, settings.steps + 1, settings.eval_every))
    # export.write_log_csv writes lr as f"{lr:.6g}" for the step it logged (step - 1, 0-based).
    assert shipped_lr == [f"{lr_at(r['step'] - 1, settings):.6g}" for r in log]
    card = (embedded / "MODEL_CARD.md").read_text(encoding="utf-8")
    n_params = settings.model_config().num_parameters
    assert f"| parameters | {n_params:,} " in card
    assert f"| final held-out loss | {log[-1]['heldout_loss']:.3f} | {math.exp(log[-1]['heldout_loss']):.1f} |" in card


def test_model_card_points_to_the_recipe():
    card = (tracer.embedded_path() / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert f"python -m {MODULE}" in card
    paths = re.findall(r"`(tools/train_tiny/[\w./]+)`", card)
    assert paths, "the card names the recipe's files"
    for path in paths:
        assert (ROOT / path).is_file(), path
    assert "tracer.train_tiny" not in card and "tracer/train_tiny" not in card
    # The card is generated by card.py (and was edited by hand when the recipe moved): what
    # card.py says about the recipe's location is what the shipped card says.
    tree = ast.parse((RECIPE / "card.py").read_text(encoding="utf-8"))
    said = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and re.search(r"tools[./]train_tiny", n.value)]
    assert len(said) >= 2, said
    for text in said:
        assert text in card, text


def test_the_runtime_does_not_contain_or_import_the_recipe():
    tracer_dir = ROOT / "tracer"
    assert not (tracer_dir / "train_tiny").exists()
    for path in sorted(tracer_dir.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(from|import)\s+tools\b", text, re.M), path
        assert "train_tiny" not in text, path


def test_help_names_the_new_command():
    proc = subprocess.run([sys.executable, "-m", MODULE, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"python -m {MODULE}" in proc.stdout


if __name__ == "__main__":
    # python tests/test_training_recipe.py MODULE TEXT: write smoke_reference.json from a run of
    # MODULE (it was made with the recipe's pre-move module, tracer.train_tiny).
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        numbers = smoke_numbers(sys.argv[1], Path(sys.argv[2]), Path(tmp))
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {REFERENCE}")
