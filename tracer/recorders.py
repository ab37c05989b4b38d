"""What a generation keeps: one recorder per capture policy, beside the Decoder (tracer.generate).

Every step of the Decoder is the same (forward, choose with :mod:`tracer.sampling`, then
``recorder.on_step``); the recorder decides what the trace keeps:

- :class:`NullRecorder` (``capture="off"``): nothing.
- :class:`LightRecorder` (``"light"``): a ``prefill``/``decode_step`` event (positions, cache, memory,
  top logits and, with ``lens=True``, the logit lens) and a ``sample`` event (each stage's top-n,
  every stage's values at one common list of candidates, what each stage kept).
- :class:`FullRecorder` (``"full"``): light, plus tensors at the chosen hook points, within a byte
  budget checked before each forward.

Each brings what it keeps to the host in ONE copy per step, together with the chosen id and the
logits' sum (finite when every logit is). On a GPU every host read waits for all the work queued
so far, so a second read per token would be a second stall of the whole pipeline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field

import torch

from . import sampling
from .errors import TraceError
from .hooks import RESID_POST, point_shapes
from .model import KVCache, LlamaModel
from .trace import CAPTURE_POLICIES, DecodeStepEvent, MemoryProbe, PrefillEvent, SampleEvent, Trace

DEFAULT_BUDGET_BYTES = 512 * 1024**2  # full capture: refuse beyond this unless raised
# The stages a light summary reads by name: the model's scores, the ones its candidates are
# taken from (after the penalty, which the warpers never reorder), the distribution drawn from.
RAW, PENALIZED, FINAL = sampling.RAW.name, sampling.REPETITION_PENALTY.name, sampling.FINAL.name


@dataclass
class CaptureOptions:
    """What to record while generating."""

    policy: str = "light"
    points: tuple[str, ...] = ()  # hook-point globs kept with policy "full"
    budget_bytes: int = DEFAULT_BUDGET_BYTES
    top_n: int = 20  # candidates kept per sampling stage and for the logit lens (not the top_k knob)
    lens: bool = False  # logit lens + residual norms per layer at the last position

    def __post_init__(self) -> None:
        if self.policy not in CAPTURE_POLICIES:
            raise TraceError(f"capture must be one of {list(CAPTURE_POLICIES)}, got {self.policy!r}")
        if isinstance(self.points, str):
            self.points = (self.points,)
        if self.points and self.policy != "full":
            raise TraceError("hook points are kept only with capture='full'")
        if self.budget_bytes <= 0:
            raise TraceError(f"budget_bytes must be positive, got {self.budget_bytes}")


@dataclass
class Step:
    """What one step computed, handed to the recorder; tensors still on the device."""

    index: int  # 0 = the prefill's step
    input_ids: list[int]  # what the forward read
    logits: torch.Tensor  # [V] at the last position, the model's dtype
    token: torch.Tensor  # [1], the chosen id (drawn, greedy or forced)
    forced: bool
    stages: dict[str, torch.Tensor] | None  # tracer.sampling.stage_scores, when the recorder keeps them
    previous: list[int]  # every id before this step's choice (prompt included)
    settings: sampling.SamplingSettings


@dataclass
class Chosen:
    """What the step's one host copy said about the choice."""

    token_id: int
    prob: float  # under the final distribution (nan where nothing is recorded)
    rank: int  # 0 = the most likely (-1 where nothing is recorded)
    finite: bool  # every logit finite; if not, the Decoder names where inf/nan appeared


def to_host(parts: list[torch.Tensor]) -> list[float]:
    """THE device -> host copy of a step: every part flattened into one tensor, one ``tolist``.

    ``cat`` promotes ids and counts to float32, exact below 2**24 (not the model's dtype: float16
    holds ids only up to 2048 exactly).
    """
    return torch.cat([p.reshape(-1) for p in parts]).tolist()


def finite(total: float, logits: torch.Tensor) -> bool:
    """Every logit finite? Their sum says yes unless it overflowed float32: only then (or on a
    real inf/nan) does the exact check read the device a second time."""
    return math.isfinite(total) or bool(torch.isfinite(logits).all())


class NullRecorder:
    """``capture="off"``: keeps nothing; the Decoder may run the compiled step and skip the stages.

    Every recorder has this shape: ``records``, ``forward``, ``on_step`` and ``fork``.
    """

    records = False  # no hooks, no stage tensors: the compiled decode step may run

    @contextmanager
    def forward(self, T: int, cache: KVCache) -> Iterator[None]:
        """Around the model call of a step that feeds ``T`` tokens: hooks, budget, timing."""
        yield None

    def on_step(self, step: Step, seen: None) -> Chosen:
        """Keep what this policy keeps of ``step``, and bring it to the host in one copy."""
        token, total = to_host([step.token, step.logits.sum(dtype=torch.float32)])
        return Chosen(int(token), math.nan, -1, finite(total, step.logits))

    def fork(self, trace: Trace) -> NullRecorder:
        """The recorder of a branch, writing to the branch's ``trace``."""
        return self


class _Clock:
    """Marks in one step: wall-clock on the CPU; on CUDA, events queued on the stream and read
    after the step's host copy (which waits for them anyway), so timing adds no sync of its own."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self.started = time.time()
        self._marks: list = []
        self.mark()

    def mark(self) -> None:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def seconds(self, i: int, j: int) -> float:
        a, b = self._marks[i], self._marks[j]
        return a.elapsed_time(b) / 1e3 if self._cuda else b - a


@dataclass
class Seen:
    """What a recorder saw of one forward: when it ran, the cache and memory after it, kept tensors."""

    clock: _Clock
    start: int  # the first position written
    T: int
    cache: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    resid: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> last position (the lens)
    sampled_at: float = 0.0  # wall-clock time the choice began


class LightRecorder:
    """``capture="light"``: summaries of every forward and every choice, no tensors."""

    records = True

    def __init__(self, model: LlamaModel, trace: Trace, options: CaptureOptions, piece) -> None:
        self.model, self.trace, self.options, self.piece = model, trace, options, piece
        self.memory = MemoryProbe(model.device)  # opens /proc/self/statm at the first step
        self._settings_json: tuple = (None, {})

    def fork(self, trace: Trace) -> LightRecorder:
        """The same recorder writing to a branch's ``trace`` (with nothing kept yet)."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.trace = trace
        return other

    @contextmanager
    def forward(self, T: int, cache: KVCache) -> Iterator[Seen]:
        seen = Seen(_Clock(self.model.device), cache.length, T)
        with ExitStack() as hooks:
            self.attach(hooks, seen)
            yield seen
        seen.clock.mark()
        seen.sampled_at = time.time()
        seen.cache, seen.memory = cache_summary(cache), self.memory.snapshot()

    def attach(self, hooks: ExitStack, seen: Seen) -> None:
        """Hooks for one forward (detached when it ends): the logit lens's residuals, if asked."""
        if not self.options.lens:
            return

        def last_resid(x, point):
            seen.resid[int(point.name.split(".")[1])] = x[0, -1].detach()

        hooks.enter_context(self.model.hooks.attach(RESID_POST.glob, last_resid))

    def on_step(self, step: Step, seen: Seen) -> Chosen:
        seen.clock.mark()  # the choice is made (the sample's seconds end here); what follows is bookkeeping
        k = min(self.options.top_n, step.stages[RAW].shape[-1])
        lens = self._lens_parts(seen, k)
        host = StageCopy(step.stages, step.token, k, lens)
        if not finite(host.total, step.logits):
            return Chosen(host.token_id, host.prob, host.rank, False)
        sample = self._sample_event(step, seen, host)
        forward = (PrefillEvent if step.index == 0 else DecodeStepEvent)(
            time=seen.clock.started, seconds=seen.clock.seconds(0, 1), step=step.index,
            positions=[seen.start, seen.start + seen.T - 1], input_ids=list(step.input_ids),
            kv_cache=seen.cache, memory=seen.memory, tensors=seen.tensors,
            top_logits={"ids": sample.stages[RAW]["ids"], "values": sample.stages[RAW]["scores"]},
        )
        if lens:
            self._fill_lens(forward, sorted(seen.resid), host.extra, k)
        self.trace.add(forward)
        self.trace.add(sample)
        return Chosen(host.token_id, host.prob, host.rank, True)

    def _sample_event(self, step: Step, seen: Seen, host: StageCopy) -> SampleEvent:
        if self._settings_json[0] is not step.settings:  # settings are frozen: convert once per change
            self._settings_json = (step.settings, asdict(step.settings))
        stages = step.stages
        candidate_ids, at_candidates = host.at_candidates(stages)
        hit = sampling.penalized_ids(step.previous, step.settings.repetition_penalty)
        return SampleEvent(
            time=seen.sampled_at, seconds=seen.clock.seconds(1, 2), step=step.index,
            settings=dict(self._settings_json[1]), stages=host.stage_table(stages),
            candidates=host.nonzero, chosen_id=host.token_id, chosen_piece=self.piece(host.token_id),
            chosen_rank=host.rank, chosen_prob=host.prob, forced=step.forced,
            candidate_ids=candidate_ids, at_candidates=at_candidates,
            kept=host.kept_by_stage(stages), mass_kept=host.mass_by_stage(stages),
            penalized=len(hit), penalized_ids=[i for i in candidate_ids if i in hit],
        )

    def _lens_parts(self, seen: Seen, k: int) -> list[torch.Tensor]:
        """Logit lens on the device: each layer's last-position residual through the final norm
        and lm_head; its top-n and the residual norms ride on the step's one host copy."""
        if not seen.resid:
            return []
        h = torch.stack([seen.resid[i] for i in sorted(seen.resid)])  # [L, D]
        probs = torch.softmax(self.model.unembed(h).float(), dim=-1)  # [L, V]
        top = torch.topk(probs, min(k, probs.shape[-1]))
        return [top.indices, top.values, h.float().norm(dim=-1)]

    @staticmethod
    def _fill_lens(event, layers: list[int], flat: list[float], k: int) -> None:
        L = len(layers)
        ids, probs, norms = flat[: L * k], flat[L * k: 2 * L * k], flat[2 * L * k: 2 * L * k + L]
        event.residual_norms = norms
        event.logit_lens = [{"layer": layer, "ids": [int(i) for i in ids[j * k:(j + 1) * k]],
                             "probs": probs[j * k:(j + 1) * k]} for j, layer in enumerate(layers)]


class FullRecorder(LightRecorder):
    """``capture="full"``: light, plus the tensors at the chosen hook points, within a byte budget
    checked before each forward (a trace that would not fit is refused before it is recorded)."""

    def __init__(self, model: LlamaModel, trace: Trace, options: CaptureOptions, piece) -> None:
        super().__init__(model, trace, options, piece)
        self.captured_bytes = 0

    def fork(self, trace: Trace) -> FullRecorder:
        other = super().fork(trace)
        other.captured_bytes = 0
        return other

    def attach(self, hooks: ExitStack, seen: Seen) -> None:
        opts, model = self.options, self.model
        if opts.points:
            names = model.hooks.select(opts.points)
            shapes = point_shapes(model.config, seen.T, seen.start + seen.T)
            need = sum(math.prod(shapes[n]) for n in names) * model.dtype.itemsize
            if self.captured_bytes + need > opts.budget_bytes:
                raise TraceError(
                    f"capture budget exceeded: this step's {len(names)} hook point(s) need "
                    f"{need / 1e6:.1f} MB on top of {self.captured_bytes / 1e6:.1f} MB already kept, "
                    f"over budget_bytes={opts.budget_bytes / 1e6:.1f} MB. Raise the budget, select "
                    "fewer points (e.g. 'blocks.0.attn.pattern'), or use capture='light'"
                )
            self.captured_bytes += need

            def keep(x, point):
                seen.tensors[point.name] = host_copy(x)

            hooks.enter_context(model.hooks.attach(names, keep))
        super().attach(hooks, seen)


def host_copy(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` on the host that does not wait for the device. On CUDA it goes into pinned
    memory without blocking: the step's one host copy, later on the same stream, waits for it.
    (A blocking copy per hook point would stall the GPU once per point.)"""
    x = x.detach()
    if x.device.type == "cpu":
        return x.clone()
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return out.copy_(x, non_blocking=True)


RECORDERS = {"off": NullRecorder, "light": LightRecorder, "full": FullRecorder}
assert tuple(RECORDERS) == CAPTURE_POLICIES


def recorder_for(options: CaptureOptions, model: LlamaModel, trace: Trace, piece) -> NullRecorder | LightRecorder:
    """The recorder of ``options.policy``: the one place a policy name picks behaviour."""
    cls = RECORDERS[options.policy]
    return cls() if cls is NullRecorder else cls(model, trace, options, piece)


def cache_summary(cache: KVCache) -> dict:
    """What a forward event says about the KV cache after it."""
    B, Hkv, _, hd = cache.keys[0].shape
    return {
        "length": cache.length,
        "max_len": cache.max_len,
        "shape_per_layer": [B, Hkv, cache.length, hd],
        "bytes_used": cache.bytes_used(),
        "bytes_allocated": cache.bytes_allocated,
    }


# ---------------------------------------------------------------------------------------------
# The light summary's one host copy


def _split(flat: list, sizes: list[int]) -> list[list]:
    """``flat`` cut into consecutive pieces of the given sizes, then the rest."""
    out, start = [], 0
    for n in sizes:
        out.append(flat[start:start + n])
        start += n
    return [*out, flat[start:]]


class StageCopy:
    """Everything a ``sample`` event shows about the stages, brought to the host in ONE copy.

    Each distinct score stage is a row (greedy passes one tensor through several stages, ranked
    once): its top-n (ids, scores, probabilities); every stage read at one common list of
    candidates (the top-n after the repetition penalty, which the warpers never reorder, then the
    chosen token), so a plot can show a cut token where it was; the tokens each stage keeps and
    the share of the previous stage's probability they hold (tracer.sampling's ``kept`` and
    ``mass_kept``); the tokens left with non-zero probability; the logits' sum (finite check);
    the chosen id, its probability and rank; then ``extra`` parts (the logit lens), in ``extra``.
    Batch 1, so counts run over the whole [1, V] (count_nonzero with dim= takes three times as long).
    """

    def __init__(self, stages, token: torch.Tensor, k: int, extra: list[torch.Tensor] = ()) -> None:
        distinct = {id(stages[n]): stages[n] for n in sampling.STAGES[:-1]}  # insertion order = rows
        self.row_of = {key: i for i, key in enumerate(distinct)}
        U = len(distinct)
        scores = stages[RAW] if U == 1 else torch.cat(list(distinct.values()))  # [U, V]
        top = torch.topk(scores, k)  # [U, k]
        final = stages[FINAL]
        softmaxes = final if U == 1 else torch.softmax(scores, dim=-1)  # [U, V]
        cand = torch.cat([top.indices[self.row_of[id(stages[PENALIZED])]], token.view(1)])
        at = cand.expand(U, -1)
        p_chosen = final[0].gather(0, token.view(1))  # gather, not final[token]: no host read
        parts = [top.indices, top.values, softmaxes.gather(-1, top.indices), scores.gather(-1, at),
                 softmaxes.gather(-1, at), sampling.kept(scores), sampling.mass_kept(softmaxes[:-1], scores[1:]),
                 torch.count_nonzero(final), stages[RAW].sum(), token, p_chosen, (final > p_chosen).sum()]
        host = to_host(parts + list(extra))  # the one device -> host copy
        m = k + 1
        ids, vals, probs, at_s, at_p, kept, mass, rest = _split(host, [U * k] * 3 + [U * m] * 2 + [U, U - 1])
        self.rows = [(list(map(int, ids[r * k:(r + 1) * k])), vals[r * k:(r + 1) * k], probs[r * k:(r + 1) * k])
                     for r in range(U)]
        self._at = [(at_s[r * m:(r + 1) * m], at_p[r * m:(r + 1) * m]) for r in range(U)]
        self._kept, self._mass = [int(n) for n in kept], mass
        self.nonzero, self.total = int(rest[0]), rest[1]
        self.token_id, self.prob, self.rank = int(rest[2]), rest[3], int(rest[4])
        self.extra = rest[5:]

    def stage_table(self, stages) -> dict[str, dict[str, list]]:
        """Each stage's top-n; ``final``'s is the last score stage's (softmax keeps the order),
        its scores the probabilities."""
        names = sampling.STAGES[:-1]
        out = {}
        for name in names:
            ids, vals, probs = self.rows[self.row_of[id(stages[name])]]
            out[name] = {"ids": ids, "scores": vals, "probs": probs}
        ids, _, probs = self.rows[self.row_of[id(stages[names[-1]])]]
        out[sampling.STAGES[-1]] = {"ids": ids, "scores": probs, "probs": probs}
        return out

    def at_candidates(self, stages) -> tuple[list[int], dict[str, dict[str, list]]]:
        """The candidate ids and each stage's scores and probabilities there; the chosen token's
        extra column is dropped when it is among the top-n already."""
        ids = self.rows[self.row_of[id(stages[PENALIZED])]][0]
        m = len(ids) + (self.token_id not in ids)
        out = {}
        for name in sampling.STAGES[:-1]:
            s, p = self._at[self.row_of[id(stages[name])]]
            out[name] = {"scores": s[:m], "probs": p[:m]}
        last = out[sampling.STAGES[-2]]["probs"]
        out[sampling.STAGES[-1]] = {"scores": last, "probs": last}
        return (ids + [self.token_id])[:m], out

    def kept_by_stage(self, stages) -> dict[str, int]:
        names = sampling.STAGES[:-1]
        out = {name: self._kept[self.row_of[id(stages[name])]] for name in names}
        out[sampling.STAGES[-1]] = out[names[-1]]  # the softmax draws from what the last stage kept
        return out

    def mass_by_stage(self, stages) -> dict[str, float]:
        """A stage that passed its input on (greedy's warpers, a knob at its neutral value) keeps all."""
        names = sampling.STAGES[:-1]
        out = {names[0]: 1.0}
        for before, name in zip(names, names[1:]):
            same = stages[name] is stages[before]
            out[name] = 1.0 if same else self._mass[self.row_of[id(stages[name])] - 1]
        out[sampling.STAGES[-1]] = 1.0
        return out
