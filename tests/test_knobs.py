"""tracer.knobs: the sampling knobs, declared once, and everything built from that declaration
(settings, generation defaults, API keywords, CLI flags, stepper widgets). Also, for every concept
declared once (hook points, knobs, dtypes): its names are string literals in its own module only."""

from __future__ import annotations

import ast
import inspect
import json
from dataclasses import fields
from pathlib import Path

import pytest

from tracer import dtypes, hooks, knobs, sampling
from tracer.api import Llama
from tracer.cli import WALKTHROUGH, as_flags, build_parser, in_cli_words
from tracer.cli import _generation_kwargs as generation_kwargs
from tracer.config import GenerationDefaults
from tracer.errors import ConfigError, GenerationError
from tracer.knobs import KNOBS, NAMES, SWITCH

TRACER = Path(__file__).resolve().parents[1] / "tracer"
NUMBERS = [k for k in KNOBS if k is not SWITCH]
# A value other than the default for each knob, each valid on its own.
OTHER = {knobs.DO_SAMPLE.name: True, knobs.TEMPERATURE.name: 0.5, knobs.TOP_K.name: 7,
         knobs.TOP_P.name: 0.8, knobs.REPETITION_PENALTY.name: 1.3}


def test_the_knobs_are_transformers_generation_knobs_with_its_defaults():
    """Names and defaults are GenerationConfig's own (transformers is the oracle: 5.x leaves the
    fields None and fills them from these defaults at generate time)."""
    from transformers import GenerationConfig

    reference = GenerationConfig._get_default_generation_params()
    assert NAMES == ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
    for k in KNOBS:
        assert k.default == reference[k.name], k.name
        assert isinstance(k.default, k.type) and k.accepts(k.default)
    # The constants name the knob they stand for (they are unpacked in declared order).
    assert [k.name for k in (knobs.DO_SAMPLE, knobs.TEMPERATURE, knobs.TOP_K, knobs.TOP_P,
                             knobs.REPETITION_PENALTY)] == list(NAMES)
    assert set(OTHER) == set(NAMES)


def test_settings_and_generation_defaults_are_the_knobs():
    """SamplingSettings and GenerationDefaults have every knob as a field, with its default, first."""
    for cls in (sampling.SamplingSettings, GenerationDefaults):
        assert issubclass(cls, knobs.Knobs)
        assert [f.name for f in fields(cls)][: len(NAMES)] == list(NAMES)
        assert knobs.values(cls()) == {k.name: k.default for k in KNOBS}


@pytest.mark.parametrize("knob", KNOBS, ids=NAMES)
def test_generation_config_json_gives_each_knob_with_its_type(knob, tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({knob.name: OTHER[knob.name]}))
    assert getattr(GenerationDefaults.from_file(path, ()), knob.name) == OTHER[knob.name]
    wrong = "yes" if knob.type is bool else True  # a bool is no number: transformers refuses it
    path.write_text(json.dumps({knob.name: wrong}))
    with pytest.raises(ConfigError, match=knob.name):
        GenerationDefaults.from_file(path, ())


def test_the_api_takes_each_knob_as_a_keyword_defaulting_to_the_model():
    params = inspect.signature(Llama.decoder).parameters
    for k in KNOBS:
        assert params[k.name].kind is inspect.Parameter.KEYWORD_ONLY and params[k.name].default is None


@pytest.mark.parametrize("knob", KNOBS, ids=NAMES)
def test_each_knob_given_to_the_api_reaches_the_decoder(knob, tiny_llm):
    value = OTHER[knob.name]
    dec = tiny_llm.decoder("It is", max_new_tokens=1, capture="off", **{knob.name: value})
    expected = {**knobs.values(tiny_llm.defaults), knob.name: value}
    assert knobs.values(dec.settings) == expected


def test_an_unknown_knob_is_refused_naming_the_knobs(tiny_llm):
    with pytest.raises(GenerationError, match="top_k"):
        tiny_llm.settings(topk=3)


def _generation_parser():
    parser = build_parser()
    return parser, parser.parse_args(["generate", "--prompt", "x"])


def test_the_cli_has_a_flag_per_knob_defaulting_to_the_model():
    parser, plain = _generation_parser()
    assert generation_kwargs(plain) == {}  # no flag: every knob keeps the model's default
    for k in NUMBERS:
        value = OTHER[k.name]
        args = parser.parse_args(["generate", "--prompt", "x", k.flag, str(value)])
        assert generation_kwargs(args) == {k.name: value}
    for value in (True, False):
        args = parser.parse_args(["generate", "--prompt", "x", f"--{SWITCH.word(value)}"])
        assert generation_kwargs(args) == {SWITCH.name: value}
    both = parser.parse_args(["generate", "--prompt", "x", "--sample", "--greedy"])
    with pytest.raises(Exception, match="contradict"):
        generation_kwargs(both)


def test_the_cli_speaks_of_the_switch_as_its_flags():
    for value in (True, False):
        assert in_cli_words(f"use {SWITCH.name}={value} here") == f"use --{SWITCH.word(value)} here"


def test_the_walkthrough_preset_sets_every_knob_and_its_help_says_so():
    parser, _ = _generation_parser()
    assert set(WALKTHROUGH) == {*NAMES, "max_new_tokens"}
    sampling.SamplingSettings(**{k: v for k, v in WALKTHROUGH.items() if k in NAMES})  # valid
    args = parser.parse_args(["generate", "--prompt", "x", "--walkthrough"])
    assert generation_kwargs(args) == WALKTHROUGH
    # Its help lists the flags that give the same settings, and they do.
    flags = as_flags(WALKTHROUGH).split()
    args = parser.parse_args(["generate", "--prompt", "x", *flags])
    assert generation_kwargs(args) == WALKTHROUGH


def test_the_stepper_has_a_widget_per_knob_over_its_declared_range():
    from tracer.viz.widgets import GREEDY_IGNORES, knob_value, knob_widget

    for k in KNOBS:
        w = knob_widget(k, OTHER[k.name])
        assert w.description == k.label and knob_value(k, w) == OTHER[k.name]
        if k is SWITCH:
            assert list(w.options) == [word for word, _ in k.words]
        else:
            assert (w.min, w.max, w.step) == k.slider and f"tracer-{k.flag[2:]}" in w._dom_classes
    assert GREEDY_IGNORES == (knobs.TEMPERATURE.name, knobs.TOP_K.name, knobs.TOP_P.name)


def test_each_stepper_widget_sets_its_knob(tiny_llm):
    from tracer.viz import StepperApp

    app = StepperApp(tiny_llm, "It is", max_new_tokens=3, seed=0)
    assert list(app.knob_widgets) == list(NAMES)
    named = {knobs.DO_SAMPLE.name: app.mode, knobs.TEMPERATURE.name: app.temperature, knobs.TOP_K.name: app.top_k,
             knobs.TOP_P.name: app.top_p, knobs.REPETITION_PENALTY.name: app.repetition_penalty}
    assert all(app.knob_widgets[name] is w for name, w in named.items())
    for k in KNOBS:
        before = knobs.values(app.decoder.settings)
        w = app.knob_widgets[k.name]
        new = (SWITCH.word(not before[k.name]) if k is SWITCH
               else next(v for v in (w.min, w.max) if v != before[k.name]))
        w.value = new
        after = knobs.values(app.decoder.settings)
        assert {n for n in NAMES if after[n] != before[n]} == {k.name}, k.name


# --- one module per concept: its names are string literals there only ------------------------------

# Literals of a declared name outside its module, in files whose owners have yet to take the name
# from the declaration. A new literal anywhere else fails; an entry no longer needed fails too, so
# that this list only shrinks. (Empty: every name is taken from its declaration.)
KNOWN: dict[tuple[str, str], set[str]] = {}
_BLOCK_NAMES = [p.name for p in hooks.POINTS if p.per_block]
CONCEPTS = {  # concept -> (its module, whether a string literal names one of its names)
    "knob": ("knobs.py", lambda s: s in NAMES),
    "dtype": ("dtypes.py", lambda s: s in dtypes.BY_NAME),
    # a point's name, or a full name or pattern ending in a block point's ("blocks.*.attn.z")
    "hook": ("hooks.py", lambda s: s in {p.name for p in hooks.POINTS}
             or any(s.endswith("." + n) for n in _BLOCK_NAMES)),
}


def string_literals(path: Path):
    """(line, text) of every string constant of a module, docstrings left out (comments are not in
    the syntax tree); the constant parts of f-strings included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def literals_of(concept: str) -> dict[str, set[str]]:
    """File (relative to tracer/) -> the names of ``concept`` it writes as literals, its module aside."""
    home, names_one = CONCEPTS[concept]
    found: dict[str, set[str]] = {}
    for path in sorted(TRACER.rglob("*.py")):
        rel = path.relative_to(TRACER).as_posix()
        if rel != home:
            hits = {text for _, text in string_literals(path) if names_one(text)}
            if hits:
                found[rel] = hits
    return found


@pytest.mark.parametrize("concept", list(CONCEPTS))
def test_names_are_literals_in_their_declaring_module_only(concept):
    found = literals_of(concept)
    new = {f: hits - KNOWN.get((concept, f), set()) for f, hits in found.items()}
    new = {f: sorted(h) for f, h in new.items() if h}
    assert not new, f"{concept} names written as literals outside tracer/{CONCEPTS[concept][0]}: {new}"


@pytest.mark.parametrize("concept", list(CONCEPTS))
def test_known_literals_are_still_there(concept):
    """An entry of KNOWN that is no longer needed: remove it (the list only shrinks)."""
    found = literals_of(concept)
    stale = {f: sorted(names - found.get(f, set())) for (c, f), names in KNOWN.items() if c == concept}
    assert not {f: s for f, s in stale.items() if s}, f"remove from KNOWN: {stale}"


def test_the_scan_sees_a_literal(tmp_path):
    """The scanner finds literals in code and f-strings, not in docstrings."""
    source = tmp_path / "m.py"
    source.write_text('"""top_k in a docstring."""\nx = {"top_k": 1}\ny = f"blocks.{0}.attn.z"  # top_p\n')
    texts = [t for _, t in string_literals(source)]
    assert "top_k" in texts and ".attn.z" in texts and "top_k in a docstring." not in texts
