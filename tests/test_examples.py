"""examples/run.py: the walkthrough's script answers on every seed, on the real chat model."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tracer.cli import WALKTHROUGH_SYSTEM

ROOT = Path(__file__).resolve().parent.parent
SEEDS = range(20)
SEED_HEADER = re.compile(r"^--- seed (\d+) ---\n", re.M)


@pytest.fixture(scope="module")
def run_py():
    spec = importlib.util.spec_from_file_location("walkthrough_run", ROOT / "examples" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def answers_by_seed(out: str) -> tuple[str, dict[int, str]]:
    """run.py's output with a range of seeds: the prompt, then one '--- seed N ---' block per seed."""
    head, *rest = SEED_HEADER.split(out)
    return head, {int(seed): text for seed, text in zip(rest[::2], rest[1::2], strict=True)}


@pytest.fixture(scope="module")
def every_seed(run_py) -> str:
    """run.py's output for seeds 0-19, short answers (the real model makes ~30 tokens/s here)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_py.main(["--seed", f"{SEEDS[0]}-{SEEDS[-1]}", "--max-new-tokens", "4"]) == 0
    return out.getvalue()


def test_the_chat_model_answers_on_every_seed(every_seed):
    """Sampling with the walkthrough's settings: no seed may end in an empty answer."""
    prompt, answers = answers_by_seed(every_seed)
    # The prompt as the model reads it: the system prompt and the question in its ChatML template.
    assert prompt.startswith(f"<|im_start|>system\n{WALKTHROUGH_SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert prompt.rstrip("\n").endswith("<|im_start|>assistant")
    assert sorted(answers) == list(SEEDS)
    empty = [seed for seed, text in answers.items() if not text.strip()]
    assert not empty, f"empty answers for seeds {empty}"


def test_one_seed_prints_like_the_pipeline(run_py, every_seed, capsys):
    """The pipeline's generated_text: the prompt as rendered, then the answer; a seed repeats it."""
    assert run_py.main(["--seed", "3", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    prompt, answers = answers_by_seed(every_seed)
    assert out == prompt.removesuffix("\n") + answers[3]  # print() ended the prompt's block with a newline


def test_the_embedded_model_continues_text_and_says_why(run_py, capsys):
    assert run_py.main(["--model", "embedded", "--seed", "0-19", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    prompt, answers = answers_by_seed(captured.out)
    assert prompt.strip() == run_py.TEXT_PROMPT  # plain text: no chat format
    assert sorted(answers) == list(SEEDS) and all(text.strip() for text in answers.values())
    assert "never saw a chat format" in captured.err and "[INST] is" in captured.err


def test_a_bad_seed_range_is_refused(run_py, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_py.main(["--seed", "5-2"])
    assert exit_.value.code == 2 and "--seed" in capsys.readouterr().err
