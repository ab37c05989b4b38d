"""Stage 7 of the walkthrough: from logits to one token, stage by stage.

Each stage is a small pure function ``scores [.., V] -> scores [.., V]`` so that its output can be
recorded and plotted. The order is transformers' (``generation/utils.py``):

    repetition penalty -> temperature -> top-k -> top-p -> softmax -> multinomial | argmax

Greedy decoding applies only the processors (repetition penalty) before argmax; the warpers
(temperature, top-k, top-p) shape a distribution to *sample* from, so they are skipped. Scores are
float32 throughout, as transformers casts the last position's logits before processing.

This module knows nothing about the model: it works on tensors and settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import GenerationError

FILTERED = float("-inf")  # what a filtered-out token's score becomes

# Stage names, in order, as recorded in ``sample`` trace events and shown in the notebooks.
STAGES = ("raw", "repetition_penalty", "temperature", "top_k", "top_p", "final")


@dataclass(frozen=True)
class SamplingSettings:
    """The knobs, with transformers' GenerationConfig defaults."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        validate(self)


def validate(s: SamplingSettings) -> None:
    """Refuse values transformers refuses, with the fix in the message."""
    def finite(name: str, v) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise GenerationError(f"{name} must be a finite number, got {v!r}")

    for name in ("temperature", "top_p", "repetition_penalty"):
        finite(name, getattr(s, name))
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
    drop_sorted[..., -1:] = False  # keep at least the most likely token
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, FILTERED)


def probabilities(scores: torch.Tensor) -> torch.Tensor:
    """softmax over the vocabulary: the final distribution."""
    return torch.softmax(scores, dim=-1)


def choose(
    probs: torch.Tensor, *, do_sample: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one id per row: multinomial with the given generator, or argmax when greedy."""
    if do_sample:
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    return torch.argmax(probs, dim=-1)


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
# The chain


def stage_scores(
    logits: torch.Tensor, previous_ids: torch.Tensor, settings: SamplingSettings
) -> dict[str, torch.Tensor]:
    """Every stage's output, in order: raw, repetition_penalty, temperature, top_k, top_p (scores)
    and final (probabilities). Greedy skips the warpers: their entries equal the previous stage."""
    s = settings
    out: dict[str, torch.Tensor] = {"raw": logits.float()}
    x = apply_repetition_penalty(out["raw"], previous_ids, s.repetition_penalty)
    out["repetition_penalty"] = x
    if s.do_sample:
        x = apply_temperature(x, s.temperature)
        out["temperature"] = x
        x = apply_top_k(x, s.top_k)
        out["top_k"] = x
        x = apply_top_p(x, s.top_p)
        out["top_p"] = x
    else:
        out["temperature"] = out["top_k"] = out["top_p"] = x
    out["final"] = probabilities(x)
    return out


def next_token(
    logits: torch.Tensor,
    previous_ids: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The same chain as :func:`stage_scores`, keeping nothing: the untraced fast path.

    Greedy takes the argmax of the processed scores directly (softmax does not move the argmax).
    """
    s = settings
    x = apply_repetition_penalty(logits.float(), previous_ids, s.repetition_penalty)
    if not s.do_sample:
        return torch.argmax(x, dim=-1)
    x = apply_top_p(apply_top_k(apply_temperature(x, s.temperature), s.top_k), s.top_p)
    return choose(probabilities(x), do_sample=True, generator=generator)


def distribution(
    logits_1d: torch.Tensor,
    previous_ids,
    *,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """The final distribution a sampler draws from, for one position's logits [V]."""
    settings = SamplingSettings(
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
    )
    prev = torch.as_tensor(list(previous_ids) if not torch.is_tensor(previous_ids) else previous_ids,
                           dtype=torch.long)
    return stage_scores(logits_1d[None], prev[None], settings)["final"][0]
