"""Stage 7 of the walkthrough: from logits to one token, stage by stage.

Each stage is a small pure function ``scores [.., V] -> scores [.., V]`` so that its output can be
recorded and plotted. The order is transformers' (``generation/utils.py``), declared once in
:data:`CHAIN` (from which ``STAGES``, the greedy subset and the sampler's loops are derived):

    repetition penalty -> temperature -> top-k -> top-p -> softmax -> draw | argmax

Greedy decoding applies only the processors (repetition penalty) before argmax; the warpers
(temperature, top-k, top-p) shape a distribution to *sample* from, so they are skipped. Scores are
float32 throughout, as transformers casts the last position's logits before processing.

This module knows nothing about the model: it works on tensors and settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import knobs
from .errors import GenerationError
from .knobs import KNOBS, Knobs

FILTERED = float("-inf")  # what a filtered-out token's score becomes


@dataclass(frozen=True)
class SamplingSettings(Knobs):
    """The knobs (declared in ``tracer/knobs.py``, with transformers' GenerationConfig defaults),
    checked as transformers checks them."""

    def __post_init__(self) -> None:
        validate(self)


def validate(s: SamplingSettings) -> None:
    """Refuse values transformers refuses, with the fix in the message."""
    for knob in KNOBS:
        v = getattr(s, knob.name)
        if knob.type is float and not (knob.accepts(v) and math.isfinite(v)):
            raise GenerationError(f"{knob.name} must be a finite number, got {v!r}")
    if s.do_sample and s.temperature <= 0:
        raise GenerationError(
            f"temperature must be > 0 when sampling, got {s.temperature}; for the most likely "
            "token every time use greedy decoding (do_sample=False)"
        )
    if not 0 < s.top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {s.top_p} (1.0 disables it)")
    if isinstance(s.top_k, bool) or not isinstance(s.top_k, int) or s.top_k < 0:
        raise GenerationError(f"top_k must be an integer >= 0, got {s.top_k!r} (0 disables it)")
    if s.repetition_penalty <= 0:
        raise GenerationError(
            f"repetition_penalty must be > 0, got {s.repetition_penalty} (1.0 disables it; "
            ">1 discourages repeats)"
        )


# ---------------------------------------------------------------------------------------------
# The stages: pure functions on scores


def apply_repetition_penalty(
    scores: torch.Tensor, previous_ids: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Make every id already in the sequence (prompt included) less likely, each id once.

    A positive score is divided by ``penalty``, a negative one multiplied, so both move down
    (CTRL's rule, as in transformers' RepetitionPenaltyLogitsProcessor).
    """
    if penalty == 1.0 or previous_ids.numel() == 0:
        return scores
    ids = previous_ids.to(scores.device).view(*scores.shape[:-1], -1)
    picked = torch.gather(scores, -1, ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(-1, ids, picked)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature: < 1 sharpens the distribution, > 1 flattens it."""
    if temperature == 1.0:
        return scores
    return scores / temperature


def apply_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep tokens scoring at least the k-th best (ties survive); 0 disables."""
    if k == 0:
        return scores
    k = min(k, scores.shape[-1])
    kth_best = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth_best, FILTERED)


def apply_top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: drop the least likely tokens whose total probability is at most 1 - p.

    Sorted ascending, a token goes if the cumulative probability up to and including it is
    <= 1 - p; the most likely token always stays.
    """
    if p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[..., -1:].fill_(False)  # keep at least the most likely token (a fill: no scalar upload)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, FILTERED)


def probabilities(scores: torch.Tensor) -> torch.Tensor:
    """softmax over the vocabulary: the final distribution."""
    return torch.softmax(scores, dim=-1)


def choose(
    probs: torch.Tensor, *, do_sample: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One id per row: a draw from ``probs`` with ``generator``, or the argmax when greedy.

    The draw is the exponential race, ``argmax(probs / q)`` with ``q ~ Exponential(1)``: exactly
    how ATen's ``torch.multinomial`` draws one sample (Distributions.cpp), so the same generator
    state gives the same token as transformers' ``multinomial``, and leaves the generator where
    multinomial would. Written out, it skips multinomial's validity checks, each a host read (a
    GPU stall) per token; the Decoder checks the logits in its one host copy per step instead.
    """
    if do_sample:
        race = torch.empty_like(probs).exponential_(1, generator=generator)
        return (probs / race).argmax(dim=-1)
    return torch.argmax(probs, dim=-1)


def pick(
    scores: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
    *,
    probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The one choice every capture policy makes, from the last score stage's ``scores``.

    Greedy takes their argmax, as transformers does (the processed scores, not their softmax: the
    same token, first index on ties); sampling draws from their softmax (``probs`` when the caller
    has it already).
    """
    if not settings.do_sample:
        return choose(scores, do_sample=False)
    return choose(probabilities(scores) if probs is None else probs, do_sample=True, generator=generator)


# ---------------------------------------------------------------------------------------------
# What a stage did: the numbers the stepper's panels state


def kept(scores: torch.Tensor) -> torch.Tensor:
    """How many tokens a score stage leaves in play (score not FILTERED), per row."""
    return (scores != FILTERED).sum(-1)


def mass_kept(prev_probs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The share of the previous stage's probability (``prev_probs``) held by the tokens that
    ``scores`` keeps, per row: 1 for a stage that removes nothing, at least p for top-p."""
    return prev_probs.masked_fill(scores == FILTERED, 0.0).sum(-1)


def penalized_ids(previous_ids, penalty: float) -> set[int]:
    """The ids the repetition penalty lowers: every distinct id so far (none when it is 1.0)."""
    return set() if penalty == 1.0 else set(previous_ids)


def stage_effects(stages: dict[str, torch.Tensor]) -> dict[str, tuple[int, float]]:
    """Stage name -> (tokens kept, share of the previous stage's probability kept) for one row of
    :func:`stage_scores`, over the whole vocabulary. ``final`` is a softmax: it draws from what
    the last score stage kept, and removes nothing."""
    out: dict[str, tuple[int, float]] = {}
    before = None
    for name in STAGES[:-1]:
        scores = stages[name]
        share = 1.0 if before is None else float(mass_kept(probabilities(before), scores).sum())
        out[name] = (int(kept(scores).sum()), share)
        before = scores
    out[STAGES[-1]] = (out[STAGES[-2]][0], 1.0)
    return out


# ---------------------------------------------------------------------------------------------
# The chain, declared once: the sampler, the recorders, the plots and the docs all read it

# What a stage is, in transformers' words: the model's output (cast to float32), a logits
# processor (applies to greedy decoding too), a logits warper (shapes a distribution to sample
# from), the distribution itself.
OUTPUT, PROCESSOR, WARPER, DISTRIBUTION = "output", "processor", "warper", "distribution"


@dataclass(frozen=True)
class Stage:
    """One link of the chain: its name (as recorded in ``sample`` events and shown in the
    notebooks), its kind, and what it does to the scores."""

    name: str
    kind: str  # OUTPUT, PROCESSOR, WARPER or DISTRIBUTION
    apply: Callable[[torch.Tensor, torch.Tensor, SamplingSettings], torch.Tensor]

    def runs(self, settings: SamplingSettings) -> bool:
        """Greedy skips the warpers: they shape a distribution to *sample* from."""
        return self.kind != WARPER or settings.do_sample


# A stage set by a knob is named as the knob (``top_k``): the event's settings and its stages
# then speak of one thing with one word.
CHAIN: tuple[Stage, ...] = (
    # transformers casts the last position's logits to float32 before processing
    Stage("raw", OUTPUT, lambda x, prev, s: x.float()),
    Stage(knobs.REPETITION_PENALTY.name, PROCESSOR,
          lambda x, prev, s: apply_repetition_penalty(x, prev, s.repetition_penalty)),
    Stage(knobs.TEMPERATURE.name, WARPER, lambda x, prev, s: apply_temperature(x, s.temperature)),
    Stage(knobs.TOP_K.name, WARPER, lambda x, prev, s: apply_top_k(x, s.top_k)),
    Stage(knobs.TOP_P.name, WARPER, lambda x, prev, s: apply_top_p(x, s.top_p)),
    Stage("final", DISTRIBUTION, lambda x, prev, s: probabilities(x)),
)
# Each stage by itself, for code that means one of them (``TOP_K.name``, never the string).
RAW, REPETITION_PENALTY, TEMPERATURE, TOP_K, TOP_P, FINAL = CHAIN
STAGES = tuple(stage.name for stage in CHAIN)  # in order, as recorded and shown
# Greedy decoding: the processors, then the argmax (drawn as the final panel).
GREEDY_STAGES = tuple(stage.name for stage in CHAIN if stage.kind != WARPER)
# Stages still in logit units (before any warper reshapes a distribution to sample from).
LOGIT_STAGES = tuple(stage.name for stage in CHAIN if stage.kind in (OUTPUT, PROCESSOR))


def stage_scores(
    logits: torch.Tensor, previous_ids: torch.Tensor, settings: SamplingSettings
) -> dict[str, torch.Tensor]:
    """Every stage's output, in :data:`CHAIN` order: raw, repetition_penalty, temperature, top_k,
    top_p (scores) and final (probabilities). A stage that does not run (greedy's warpers) passes
    its input on: its entry is the previous stage's tensor itself."""
    out: dict[str, torch.Tensor] = {}
    x = logits
    for stage in CHAIN:
        if stage.runs(settings):
            x = stage.apply(x, previous_ids, settings)
        out[stage.name] = x
    return out


def pick_from_stages(
    stages: dict[str, torch.Tensor], settings: SamplingSettings, generator: torch.Generator | None = None
) -> torch.Tensor:
    """:func:`pick` on the output of :func:`stage_scores`: the last score stage, and the
    distribution after it reused for a draw."""
    *_, last_scores, distribution = CHAIN
    return pick(stages[last_scores.name], settings, generator, probs=stages[distribution.name])


def next_token(
    logits: torch.Tensor,
    previous_ids: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The same chain as :func:`stage_scores`, keeping nothing (the untraced path), then :func:`pick`.

    Greedy so skips the softmax: it does not move the argmax.
    """
    x = logits
    for stage in CHAIN[:-1]:  # the score stages: pick() makes the distribution only to draw
        if stage.runs(settings):
            x = stage.apply(x, previous_ids, settings)
    return pick(x, settings, generator)


def distribution(logits_1d: torch.Tensor, previous_ids, **knob_values: bool | int | float) -> torch.Tensor:
    """The final distribution a sampler draws from, for one position's logits [V].

    ``knob_values``: knobs by name (``temperature=0.7, top_k=40``); the others keep their defaults
    (``tracer/knobs.py``), ``do_sample`` True: the distribution is the one drawn from.
    """
    settings = SamplingSettings(**{knobs.DO_SAMPLE.name: True, **knob_values})
    prev = torch.as_tensor(list(previous_ids) if not torch.is_tensor(previous_ids) else previous_ids,
                           dtype=torch.long)
    return stage_scores(logits_1d[None], prev[None], settings)[FINAL.name][0]
