"""The sampling knobs, declared once (stage 7 of the walkthrough: from logits to one token).

:class:`Knobs` is the declaration: one field per knob, named as transformers' ``GenerationConfig``
names it, with transformers' default, and in its metadata what the command line and the stepper
show (a help line, a widget's label and range). Everything else is built from it:

- ``sampling.SamplingSettings``: the knobs, checked (a subclass);
- ``config.GenerationDefaults``: the knobs as generation_config.json sets them (a subclass);
- ``Llama.settings`` / ``decoder`` / ``generate``: their keyword arguments (tests check the names);
- ``python -m tracer``: one flag per knob (``--top-k``; the switch as ``--sample`` / ``--greedy``);
- ``viz.StepperApp``: one widget per knob (a toggle for the switch, a slider for each number).

The bottom layer: it imports nothing of the tracer's.
"""

# No ``from __future__ import annotations`` here: a field's ``type`` must be the class itself (bool,
# int, float), which the CLI parses with and the checks compare against.
from dataclasses import dataclass, field, fields


def _knob(default, help: str, label: str, *, slider=None, words=None):
    """A knob's field: its default and what the CLI and the stepper show (see :class:`Knob`)."""
    return field(default=default, metadata={"knob": (help, label, slider, words)})


@dataclass(frozen=True)
class Knobs:
    """The sampling knobs, with transformers' GenerationConfig defaults."""

    do_sample: bool = _knob(
        False, "draw each token from the final distribution, or take the most likely one", "decoding",
        words=(("sample", "draw each token from the final distribution"),
               ("greedy", "take the most likely token (argmax after the repetition penalty)")))
    temperature: float = _knob(
        1.0, "divide the scores by it: below 1 sharpens the distribution, above 1 flattens it",
        "temperature", slider=(0.05, 2.0, 0.05))
    top_k: int = _knob(
        50, "keep only the k most likely tokens (0: all)", "top-k (0 = off)", slider=(0, 200, 1))
    top_p: float = _knob(
        1.0, "keep only the most likely tokens that hold probability p (1: all)", "top-p (1 = off)",
        slider=(0.05, 1.0, 0.01))
    repetition_penalty: float = _knob(
        1.0, "make every token already in the text less likely (1: off; above 1 discourages repeats)",
        "repetition penalty", slider=(1.0, 2.0, 0.05))


@dataclass(frozen=True)
class Knob:
    """One knob as the rest of the code reads it: a field of :class:`Knobs` and its metadata."""

    name: str
    type: type  # bool, int or float
    default: bool | int | float
    help: str
    label: str  # the stepper's description of its widget
    slider: tuple[float, float, float] | None  # a number's slider: (min, max, step)
    # The switch's two settings, True's then False's, as (word, what it does): its CLI flags, its toggle.
    words: tuple[tuple[str, str], tuple[str, str]] | None

    @property
    def flag(self) -> str:
        """The CLI flag of a number knob: ``--top-k``."""
        return "--" + self.name.replace("_", "-")

    def word(self, value: bool) -> str:
        """The switch's word for a setting: ``SWITCH.word(False)`` -> "greedy"."""
        return self.words[0 if value else 1][0]

    def accepts(self, value: object) -> bool:
        """Whether ``value`` has this knob's type as transformers checks it (a bool is no number;
        an integer is a float's value too)."""
        if self.type is bool or isinstance(value, bool):
            return isinstance(value, bool) and self.type is bool
        return isinstance(value, int) if self.type is int else isinstance(value, (int, float))


KNOBS: tuple[Knob, ...] = tuple(Knob(f.name, f.type, f.default, *f.metadata["knob"]) for f in fields(Knobs))
NAMES = tuple(k.name for k in KNOBS)
# Each knob by itself, for code that means one of them (``TOP_K.name``, never the string).
DO_SAMPLE, TEMPERATURE, TOP_K, TOP_P, REPETITION_PENALTY = KNOBS
SWITCH = DO_SAMPLE  # the one on/off knob: sampling or greedy decoding; the others are numbers


def values(settings: Knobs) -> dict[str, bool | int | float]:
    """The knobs of ``settings`` (any :class:`Knobs`: sampling settings, generation defaults) by name."""
    return {name: getattr(settings, name) for name in NAMES}
