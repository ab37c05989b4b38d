"""Stages 5-7 of the walkthrough as a state machine: prefill, then (sample, decode_step) per token.

:class:`Decoder` holds one generation: its :class:`State`, the :class:`Tokens` it runs on (prompt,
then the chosen ids), the KV cache and the random generator. It advances one token per
:meth:`Decoder.step`, so a notebook can step it, change the sampling knobs between steps, or
branch with a token of the user's choosing; :meth:`Decoder.run` is the plain loop.

Every step is the same three moves, in every capture policy:

1. forward: the whole prompt when ``FRESH`` (the prefill), else the last chosen id (a decode step);
2. choose: :mod:`tracer.sampling`'s chain and its one choice (greedy argmax or a seeded draw);
3. ``recorder.on_step``: the recorder of the capture policy (:mod:`tracer.recorders`) keeps what
   it keeps and brings it to the host with the chosen id, in one copy.

The next forward happens only when the next token is asked for, so the trace reads prefill,
sample, (decode_step, sample) x (n - 1).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import sampling
from .errors import GenerationError, NumericsError
from .model import KVCache, LlamaModel
from .recorders import DEFAULT_BUDGET_BYTES, CaptureOptions, Step, recorder_for
from .trace import Trace

if TYPE_CHECKING:  # tracer.fast imports torch._dynamo (and sympy): seconds, paid only by compile=True
    from .fast import CompiledStep

__all__ = ["CACHE_BUCKET", "DEFAULT_BUDGET_BYTES", "CaptureOptions", "Decoder", "State", "StepRecord",
           "Tokens", "first_nonfinite_point"]

CACHE_BUCKET = 256  # KV cache sizes for a compiled step: multiples of this (one graph per size)


@dataclass
class StepRecord:
    """What one step produced (kept for branching and for the notebooks)."""

    step: int
    token_id: int
    prob: float
    rank: int
    forced: bool


class State(enum.Enum):
    """Where a generation stands. ``step()`` moves FRESH -> DECODING -> ... -> FINISHED."""

    FRESH = "fresh"  # nothing run yet: the next step prefills the prompt
    DECODING = "decoding"  # the cache holds every id but the last chosen one: the next step feeds it
    FINISHED = "finished"  # EOS or max_new_tokens reached: step() refuses


class Tokens:
    """The ids a generation runs on: the prompt, then the chosen ids.

    Kept twice: as lists on the host (what the notebooks read) and in one device buffer sized for
    the whole generation, which the forward and the repetition penalty read as views, so a step
    uploads no ids (the prompt goes up once, each chosen id is written where it belongs).
    """

    def __init__(self, prompt: list[int], capacity: int, device: torch.device) -> None:
        self.prompt: list[int] = list(prompt)
        self.new: list[int] = []
        self.buffer = torch.zeros(capacity, dtype=torch.long, device=device)
        self.buffer[: len(prompt)] = torch.tensor(prompt)

    def __len__(self) -> int:
        return len(self.prompt) + len(self.new)

    @property
    def all(self) -> list[int]:
        return self.prompt + self.new

    def so_far(self) -> torch.Tensor:
        """Every id so far, [1, n], on the device (what the repetition penalty reads)."""
        return self.buffer[None, : len(self)]

    def last(self, n: int) -> torch.Tensor:
        """The last ``n`` ids, [1, n], on the device (strides (n, 1) whatever the buffer's size)."""
        return self.buffer[len(self) - n : len(self)].view(1, n)

    def append(self, token_id: int, token: torch.Tensor) -> None:
        """Take the chosen id: ``token_id`` on the host, ``token`` [1] already on the device (a
        device copy, where writing the host int would upload it)."""
        self.buffer[len(self) : len(self) + 1].copy_(token)
        self.new.append(token_id)

    def cut(self, n_new: int) -> Tokens:
        """A copy holding the prompt and the first ``n_new`` chosen ids (for a branch)."""
        other = object.__new__(Tokens)
        other.prompt, other.new, other.buffer = self.prompt, self.new[:n_new], self.buffer.clone()
        return other


class Decoder:
    """One generation in progress. Create with :meth:`tracer.api.Llama.decoder`."""

    def __init__(
        self,
        model: LlamaModel,
        prompt_ids: list[int],
        settings: sampling.SamplingSettings,
        *,
        max_new_tokens: int,
        eos_ids: tuple[int, ...] = (),
        seed: int | None = None,
        capture: CaptureOptions | None = None,
        trace: Trace | None = None,
        piece=lambda i: str(i),
        fast_step: CompiledStep | None = None,
    ) -> None:
        _check_request(model, prompt_ids, max_new_tokens)
        self.model = model
        self.settings = settings
        self.max_new_tokens = max_new_tokens
        self.eos_ids = tuple(eos_ids)
        self.capture = capture or CaptureOptions()
        self.trace = trace if trace is not None else Trace()
        self.piece = piece
        # The capture policy picks its recorder, here and nowhere else.
        self.recorder = recorder_for(self.capture, model, self.trace, piece)
        self.state = State.FRESH
        self.finish_reason: str | None = None
        self.history: list[StepRecord] = []
        total = len(prompt_ids) + max_new_tokens
        self.tokens = Tokens(prompt_ids, total, model.device)
        self._init_fast_path(fast_step, total)
        self.seed = seed
        self.generator = torch.Generator(device=model.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        # The generator's state before each draw, by step: a branch at step s resumes the random
        # stream where the run left it after s, whatever the run did later.
        self._draw_states: dict[int, torch.Tensor] = {}

    def _init_fast_path(self, fast_step: CompiledStep | None, total: int) -> None:
        """The cache, and whether decode steps may run the compiled step.

        Only a recorder that records nothing lets them (tracer.fast.CompiledStep: LlamaModel's
        decode math, static shapes, fused kernels; no hooks run there); prefill stays eager. The
        trace's meta says which path the decode steps take ("step") and, if this generation
        compiled, how long that took ("compile_seconds", not one copied from the load trace).
        """
        cfg = self.model.config
        self.fast_step = fast_step
        self._compiled = fast_step if not self.recorder.records else None
        self.trace.meta["step"] = fast_step.kind if self._compiled is not None else "eager"
        self.trace.meta.pop("compile_seconds", None)
        # Sized for what this generation can reach, not for max_position_embeddings. A compiled
        # step has static shapes, so there the size is rounded up to a multiple of CACHE_BUCKET:
        # generations of different lengths then share one compiled graph (extra slots are masked).
        size = total if fast_step is None else min(-(-total // CACHE_BUCKET) * CACHE_BUCKET, cfg.max_position_embeddings)
        self.cache: KVCache = self.model.new_cache(size)

    # --- state --------------------------------------------------------------------------------
    @property
    def prompt_ids(self) -> list[int]:
        return self.tokens.prompt

    @property
    def new_ids(self) -> list[int]:
        return self.tokens.new

    @property
    def ids(self) -> list[int]:
        return self.tokens.all

    @property
    def finished(self) -> bool:
        return self.state is State.FINISHED

    # --- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, force_id: int | None = None) -> StepRecord:
        """Generate one token (or take ``force_id``): forward, choose, record."""
        if self.state is State.FINISHED:
            raise GenerationError(f"generation already finished ({self.finish_reason}); start a new one")
        V = self.model.config.vocab_size
        if force_id is not None and not 0 <= force_id < V:
            raise GenerationError(f"token id {force_id} is outside the vocabulary [0, {V})")
        # FRESH: the whole prompt (the prefill). DECODING: the last chosen id, not yet in the cache.
        fed = self.tokens.prompt if self.state is State.FRESH else self.tokens.new[-1:]
        with self.recorder.forward(len(fed), self.cache) as seen:
            logits = self._forward(self.tokens.last(len(fed)))
        index = len(self.tokens.new)
        token, stages = self._choose(logits, force_id)
        step = Step(index, fed, logits, token, force_id is not None, stages, self.tokens.all, self.settings)
        chosen = self.recorder.on_step(step, seen)
        if not chosen.finite:
            raise self._nonfinite(index)
        return self._advance(StepRecord(index, chosen.token_id, chosen.prob, chosen.rank, force_id is not None), token)

    def run(self, n: int | None = None) -> list[StepRecord]:
        """Up to ``n`` steps (all remaining when None), stopping at EOS or max_new_tokens."""
        out = []
        while self.state is not State.FINISHED and (n is None or len(out) < n):
            out.append(self.step())
        return out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [V] at the last position of ``x``, written into the cache."""
        # Hooks run only in the eager model; a compiled graph would skip a hook attached later.
        if self._compiled is None or self.state is State.FRESH or self.model.hooks.any_active:
            return self.model(x, self.cache, last_only=True)[0, -1]
        start = self.cache.length
        compiled = self._compiled.compile_seconds
        before = len(compiled)
        # `at` writes the token and position into the step's own buffers: no tensor per step.
        logits = self._compiled.at(x, start, self.cache)[0]
        if len(compiled) != before:  # this step compiled: its seconds go into this trace's meta
            self.trace.meta["compile_seconds"] = self.trace.meta.get("compile_seconds", 0.0) + sum(compiled[before:])
        self.cache.length = start + 1
        return logits

    def _choose(self, logits: torch.Tensor, force_id: int | None) -> tuple[torch.Tensor, dict | None]:
        """The chosen id [1] on the device, and the stage tensors if the recorder keeps them.

        Every policy chooses through tracer.sampling's one choice; nothing is read back here.
        """
        s, previous = self.settings, self.tokens.so_far()
        stages = sampling.stage_scores(logits[None], previous, s) if self.recorder.records else None
        if force_id is not None:  # a fill, not an upload; a forced token draws nothing
            return torch.full((1,), force_id, dtype=torch.long, device=logits.device), stages
        if s.do_sample:
            self._draw_states[len(self.tokens.new)] = self.generator.get_state()  # for branch()
        if stages is None:
            return sampling.next_token(logits[None], previous, s, self.generator), None
        return sampling.pick_from_stages(stages, s, self.generator), stages

    def _advance(self, record: StepRecord, token: torch.Tensor) -> StepRecord:
        """Take the chosen id and move the state on."""
        self.history.append(record)
        self.tokens.append(record.token_id, token)
        if record.token_id in self.eos_ids:
            self.state, self.finish_reason = State.FINISHED, "eos"
        elif len(self.tokens.new) >= self.max_new_tokens:
            self.state, self.finish_reason = State.FINISHED, "max_new_tokens"
        else:
            self.state = State.DECODING
        return record

    def _nonfinite(self, step: int) -> NumericsError:
        where = first_nonfinite_point(self.model, self.ids)
        return NumericsError(
            f"non-finite logits at step {step} ({self.model.dtype}); the first inf/nan appeared at "
            f"hook point {where!r}. In float16 this is usually an overflow: load with "
            "dtype='bfloat16' or 'float32'"
        )

    # --- branching ----------------------------------------------------------------------------
    def branch(self, step: int, token_id: int) -> Decoder:
        """A new decoder equal to this one before ``step``, taking ``token_id`` at ``step``.

        The KV cache is copied and cut back to the positions before that step, so nothing is
        recomputed except the step itself. When sampling, later draws use the random stream the run
        had after ``step``: branching with the token the run took there reproduces the run.
        """
        if not 0 <= step < len(self.tokens.new):
            raise GenerationError(f"can only branch at a step already taken (0..{len(self.tokens.new) - 1}), got {step}")
        other = object.__new__(Decoder)
        other.__dict__.update(self.__dict__)
        other.tokens = self.tokens.cut(step)
        other.history = self.history[:step]
        other.state, other.finish_reason = (State.FRESH if step == 0 else State.DECODING), None
        other.trace = Trace(meta=self.trace.meta)
        other.trace.events = [e for e in self.trace.events if getattr(e, "step", -1) < step]
        other.recorder = self.recorder.fork(other.trace)
        other.cache = self.cache.clone()
        # Positions written before `step`'s forward: the prompt, plus one per earlier decode.
        other.cache.truncate(len(self.tokens.prompt) + max(step - 1, 0) if step else 0)
        # The branch goes on with the random stream the run had right after `step` (a forced
        # token draws nothing): only draws advance the generator, so that is the state saved
        # before the first draw after `step`, or the current one if none came since.
        later = [state for s, state in sorted(self._draw_states.items()) if s > step]
        other.generator = torch.Generator(device=self.model.device)
        other.generator.set_state(later[0] if later else self.generator.get_state())
        other._draw_states = {s: state for s, state in self._draw_states.items() if s < step}
        other.step(force_id=token_id)
        return other


def _check_request(model: LlamaModel, prompt_ids: list[int], max_new_tokens: int) -> None:
    """Refuse a generation the model cannot run, naming the value to change."""
    cfg = model.config
    if not prompt_ids:
        raise GenerationError("the prompt is empty: give at least one token (BOS counts)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    total = len(prompt_ids) + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise GenerationError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
            f"exceeds the model's max_position_embeddings ({cfg.max_position_embeddings}); "
            "shorten the prompt or ask for fewer tokens"
        )
    bad = [i for i in prompt_ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise GenerationError(f"prompt ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")


@torch.inference_mode()
def first_nonfinite_point(model: LlamaModel, ids: list[int]) -> str | None:
    """Re-run ``ids`` without a cache and return the first hook point holding inf/nan."""
    found: list[str] = []

    def check(x, point):
        if not found and not bool(torch.isfinite(x).all()):
            found.append(point.name)

    with model.hooks.attach("*", check):
        model(torch.tensor([ids], device=model.device))
    return found[0] if found else None
