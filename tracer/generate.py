"""Stages 5-7 of the walkthrough as a state machine: prefill, then (sample, decode_step) per token.

:class:`Decoder` holds one generation's state (ids so far, KV cache, random generator) and
advances one token per :meth:`Decoder.step`, so a notebook can step it, change the sampling
knobs between steps, or branch with a token of the user's choosing. ``generate`` is the plain loop.

Per step: (first step) prefill the prompt, else feed the last token through the cache; then run the
sampling stages and choose. The next forward happens only when the next token is asked for, so the
trace reads prefill, sample, (decode_step, sample) x (n - 1).

Tracing stays out of the hot path: ``capture="off"`` records nothing; ``"light"`` takes each
stage's top-k, every stage's values at one common list of candidates and what each stage kept on
the device, and copies them to the host once per step; ``"full"`` also keeps tensors
at the chosen hook points, within a byte budget checked before each forward.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from . import sampling
from .errors import GenerationError, NumericsError, TraceError
from .hooks import point_shapes
from .model import KVCache, LlamaModel
from .trace import (
    CAPTURE_POLICIES,
    DecodeStepEvent,
    ForwardEvent,
    MemoryProbe,
    PrefillEvent,
    SampleEvent,
    Trace,
)

if TYPE_CHECKING:  # tracer.fast imports torch._dynamo (and sympy): seconds, paid only by compile=True
    from .fast import CompiledStep

DEFAULT_BUDGET_BYTES = 512 * 1024**2  # full capture: refuse beyond this unless raised
CACHE_BUCKET = 256  # KV cache sizes for a compiled step: multiples of this (one graph per size)


@dataclass
class CaptureOptions:
    """What to record while generating."""

    policy: str = "light"
    points: tuple[str, ...] = ()  # hook-point globs kept with policy "full"
    budget_bytes: int = DEFAULT_BUDGET_BYTES
    top_k: int = 20  # candidates kept per sampling stage and for the logit lens
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
class StepRecord:
    """What one step produced (kept for branching and for the notebooks)."""

    step: int
    token_id: int
    prob: float
    rank: int
    forced: bool


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
        self.model = model
        self.settings = settings
        self.prompt_ids = list(prompt_ids)
        self.new_ids: list[int] = []
        self.max_new_tokens = max_new_tokens
        self.eos_ids = tuple(eos_ids)
        self.capture = capture or CaptureOptions()
        self.trace = trace if trace is not None else Trace()
        self.piece = piece
        # capture="off" may run a compiled decode step (tracer.fast.CompiledStep: LlamaModel.step's
        # math, static shapes, fused kernels); prefill and traced runs stay eager. The trace's
        # meta says which path the decode steps take ("step") and, if this generation compiled,
        # how long that took ("compile_seconds", not one copied from the load trace).
        self.fast_step = fast_step
        fast = fast_step is not None and self.capture.policy == "off"
        self.trace.meta["step"] = fast_step.kind if fast else "eager"
        self.trace.meta.pop("compile_seconds", None)
        self.history: list[StepRecord] = []
        self.finish_reason: str | None = None
        self.seed = seed
        self.generator = torch.Generator(device=model.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        # The generator's state before each draw, by step: a branch at step s resumes the random
        # stream where the run left it after s, whatever the run did later.
        self._draw_states: dict[int, torch.Tensor] = {}
        # Sized for what this generation can reach, not for max_position_embeddings. A compiled
        # step has static shapes, so there the size is rounded up to a multiple of CACHE_BUCKET:
        # generations of different lengths then share one compiled graph (extra slots are masked).
        size = total if fast_step is None else min(-(-total // CACHE_BUCKET) * CACHE_BUCKET, cfg.max_position_embeddings)
        self.cache: KVCache = model.new_cache(size)
        # All ids (prompt + generated) on the device, for the repetition penalty without a copy.
        self._id_buf = torch.zeros(total, dtype=torch.long, device=model.device)
        self._id_buf[: len(prompt_ids)] = torch.tensor(prompt_ids)
        self._captured_bytes = 0
        self._settings_json: tuple = (None, {})
        self._on_cuda = model.device.type == "cuda"
        self._memory = MemoryProbe(model.device)  # opens /proc/self/statm at the first traced step

    # --- state --------------------------------------------------------------------------------
    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.new_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    # --- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, force_id: int | None = None) -> StepRecord:
        """Generate one token (or take ``force_id``), recording the stages per the capture policy."""
        if self.finished:
            raise GenerationError(f"generation already finished ({self.finish_reason}); start a new one")
        if force_id is not None and not 0 <= force_id < self.model.config.vocab_size:
            raise GenerationError(f"token id {force_id} is outside the vocabulary [0, {self.model.config.vocab_size})")
        logits = self._forward()
        return self._sample(logits, force_id)

    def run(self, n: int | None = None) -> list[StepRecord]:
        """Up to ``n`` steps (all remaining when None), stopping at EOS or max_new_tokens."""
        out = []
        while not self.finished and (n is None or len(out) < n):
            out.append(self.step())
        return out

    def _forward(self) -> torch.Tensor:
        step = len(self.new_ids)
        first = step == 0
        ids = self.prompt_ids if first else self.new_ids[-1:]
        # The ids already sit in the device buffer (the repetition penalty reads it too): a view,
        # not a new host -> device tensor per step.
        end = len(self.prompt_ids) + step
        x = self._id_buf[None, end - len(ids) : end]  # [1, T]
        policy = self.capture.policy
        if policy == "off":
            # Hooks run only in the eager model; a compiled graph would skip a hook attached later.
            if first or self.fast_step is None or self.model.hooks.any_active:
                return self.model(x, self.cache, last_only=True)[0, -1]  # checked in _sample
            return self._fast_forward(end)
        started, t0 = time.time(), time.perf_counter()
        start = self.cache.length
        if policy == "light" and not self.capture.lens:
            recorder = None  # nothing to attach: no context to enter
            logits = self.model(x, self.cache, last_only=True)[0, -1]
        else:
            with _Recorder(self, len(ids)) as recorder:
                logits = self.model(x, self.cache, last_only=True)[0, -1]
        if self._on_cuda:
            torch.cuda.synchronize(self.model.device)
        cls = PrefillEvent if first else DecodeStepEvent
        event = cls(
            time=started,
            seconds=time.perf_counter() - t0,
            step=step,
            positions=[start, start + len(ids) - 1],
            input_ids=list(ids),
            kv_cache=_cache_summary(self.cache),
            memory=self._memory.snapshot(),
            tensors=recorder.tensors if recorder else {},
        )
        if recorder:
            recorder.fill_lens(event, self.model, self.capture.top_k)
        # top_logits is filled from the sample stage's "raw" top-k (the same numbers, one copy);
        # finiteness is checked there too, in the same host copy.
        self.trace.add(event)
        return logits.float()

    def _fast_forward(self, end: int) -> torch.Tensor:
        """One decode step on the compiled step. The first with a cache of a new size compiles:
        the seconds that took (``fast_step.compile_seconds``) go into this generation's trace meta."""
        start = self.cache.length
        position = torch.tensor([start], device=self.model.device)
        token = self._id_buf[end - 1 : end].view(1, 1)  # strides (1, 1) whatever the buffer's length
        compiled = self.fast_step.compile_seconds
        before = len(compiled)
        logits = self.fast_step(token, position, self.cache)[0]
        if len(compiled) != before:
            self.trace.meta["compile_seconds"] = self.trace.meta.get("compile_seconds", 0.0) + sum(compiled[before:])
        self.cache.length = start + 1
        return logits

    def _sample(self, logits: torch.Tensor, force_id: int | None) -> StepRecord:
        step = len(self.new_ids)
        s = self.settings
        prev = self._id_buf[None, : len(self.prompt_ids) + step]  # every id so far, on the device
        if s.do_sample and force_id is None:
            # multinomial refuses nan/inf with a bare RuntimeError: name the cause first. Greedy
            # argmax copes with them, so there the check rides on the step's one host copy.
            self._check_finite(logits, step)
            self._draw_states[step] = self.generator.get_state()  # for branch(): before the draw
        if self.capture.policy == "off":
            return self._sample_untraced(logits, prev, force_id, step)
        t0, started = time.perf_counter(), time.time()
        stages = sampling.stage_scores(logits[None], prev, s)
        drawn = None  # the token, when it must come from the device
        if force_id is None and s.do_sample:
            drawn = sampling.choose(stages["final"], do_sample=True, generator=self.generator)[0]
        # Greedy: argmax of the processed scores, as transformers does (not of the softmax). The
        # recorded top-k of that stage already holds it, so no separate argmax runs.
        token_id, prob, rank_i = self._record_sample(stages, drawn, step, force_id, started, t0)
        return self._append(StepRecord(step, token_id, prob, rank_i, force_id is not None))

    def _sample_untraced(self, logits, prev, force_id, step) -> StepRecord:
        """capture="off": the sampling chain, nothing kept, one host sync for id + finiteness."""
        if force_id is None:
            token = sampling.next_token(logits[None], prev, self.settings, self.generator)[0]
        else:
            token = torch.tensor(force_id, device=logits.device)
        # A sum is finite if every logit is (barring fp32 overflow, which the exact check clears).
        # Ids below 2**24 are exact in float32.
        f32 = torch.float32  # not the model's dtype: float16 holds ids only up to 2048 exactly
        token_id, total = torch.stack([token.to(f32), logits.sum(dtype=f32)]).tolist()
        token_id = int(token_id)
        if not math.isfinite(total):
            self._check_finite(logits, step)
        return self._append(StepRecord(step, token_id, float("nan"), -1, force_id is not None))

    def _append(self, record: StepRecord) -> StepRecord:
        self.history.append(record)
        self._id_buf[len(self.prompt_ids) + len(self.new_ids)] = record.token_id
        self.new_ids.append(record.token_id)
        if record.token_id in self.eos_ids:
            self.finish_reason = "eos"
        elif len(self.new_ids) >= self.max_new_tokens:
            self.finish_reason = "max_new_tokens"
        return record

    def _record_sample(self, stages, drawn, step, force_id, started, t0):
        """Record the sample event from one host copy; return the token (forced, ``drawn`` or
        greedy), its final probability and its rank."""
        names = sampling.STAGES[:-1]
        V = stages["raw"].shape[-1]
        k = min(self.capture.top_k, V)
        host = _StageCopy(stages, drawn, force_id, k)
        if not math.isfinite(host.total):
            self._check_finite(stages["raw"][0], step)
        stage_table = {name: host.top(stages[name]) for name in names}
        # softmax keeps the order: final's top-k is the last score stage's, its scores the probs.
        ids, vals, probs = host.rows[host.row_of[id(stages[names[-1]])]]
        stage_table["final"] = {"ids": ids, "scores": probs, "probs": probs}
        if force_id is not None:
            token_id = force_id
        elif drawn is not None:
            token_id = host.drawn
        elif V == 1 or (k > 1 and vals[0] > vals[1]):
            token_id = ids[0]  # the greedy pick: a strict maximum is the top-1
        else:
            # A tie at the top (or top_k=1): topk's order among equals is unspecified, while argmax
            # (and transformers) takes the first index. Ask the device.
            token_id = int(sampling.choose(stages[names[-1]], do_sample=False)[0])
        if token_id in ids:
            # Every token more likely than one in the top-k is in the top-k too: rank on the host.
            prob = probs[ids.index(token_id)]
            rank_i = next(i for i, p in enumerate(probs) if p <= prob)  # probs descend: count those above
        else:  # a forced or unlikely draw outside the top-k: ask the device (one more sync)
            final = stages["final"][0]
            prob = float(final[token_id])
            rank_i = int((final > prob).sum())
        if self._settings_json[0] is not self.settings:  # settings are frozen: convert once per change
            self._settings_json = (self.settings, asdict(self.settings))
        candidate_ids, at_candidates = host.at_candidates(stages, token_id)
        hit = sampling.penalized_ids(self.ids, self.settings.repetition_penalty)
        event = SampleEvent(
            time=started,
            step=step,
            settings=dict(self._settings_json[1]),
            stages=stage_table,
            candidates=host.nonzero,
            chosen_id=token_id,
            chosen_piece=self.piece(token_id),
            chosen_rank=rank_i,
            chosen_prob=prob,
            forced=force_id is not None,
            candidate_ids=candidate_ids,
            at_candidates=at_candidates,
            kept=host.kept_by_stage(stages),
            mass_kept=host.mass_by_stage(stages),
            penalized=len(hit),
            penalized_ids=[i for i in candidate_ids if i in hit],
        )
        event.seconds = time.perf_counter() - t0
        forward = self.trace.events[-1]
        if isinstance(forward, ForwardEvent) and forward.step == step:
            forward.top_logits = {"ids": stage_table["raw"]["ids"], "values": stage_table["raw"]["scores"]}
        self.trace.add(event)
        return token_id, prob, rank_i

    def _check_finite(self, logits: torch.Tensor, step: int) -> None:
        if bool(torch.isfinite(logits).all()):
            return
        where = first_nonfinite_point(self.model, self.ids)
        raise NumericsError(
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
        if not 0 <= step < len(self.new_ids):
            raise GenerationError(f"can only branch at a step already taken (0..{len(self.new_ids) - 1}), got {step}")
        other = object.__new__(Decoder)
        other.__dict__.update(self.__dict__)
        other.new_ids = self.new_ids[:step]
        other.history = self.history[:step]
        other.finish_reason = None
        other.trace = Trace(meta=self.trace.meta)
        other.trace.events = [e for e in self.trace.events if getattr(e, "step", -1) < step]
        other.cache = self.cache.clone()
        other._id_buf = self._id_buf.clone()
        # Positions written before `step`'s forward: the prompt, plus one per earlier decode.
        other.cache.truncate(len(self.prompt_ids) + max(step - 1, 0) if step else 0)
        # The branch goes on with the random stream the run had right after `step` (a forced
        # token draws nothing): only draws advance the generator, so that is the state saved
        # before the first draw after `step`, or the current one if none came since.
        later = [state for s, state in sorted(self._draw_states.items()) if s > step]
        other.generator = torch.Generator(device=self.model.device)
        other.generator.set_state(later[0] if later else self.generator.get_state())
        other._draw_states = {s: state for s, state in self._draw_states.items() if s < step}
        other._captured_bytes = 0
        other.step(force_id=token_id)
        return other


# ---------------------------------------------------------------------------------------------
# Helpers


def _cache_summary(cache: KVCache) -> dict:
    B, Hkv, _, hd = cache.keys[0].shape
    return {
        "length": cache.length,
        "max_len": cache.max_len,
        "shape_per_layer": [B, Hkv, cache.length, hd],
        "bytes_used": cache.bytes_used(),
        "bytes_allocated": cache.bytes_allocated,
    }


class _StageCopy:
    """Everything a ``sample`` event shows about the stages, brought to the host in ONE copy.

    Each distinct score stage is a row (greedy passes one tensor through several stages, ranked
    once): its top-k (ids, scores, probabilities); every stage read at one common list of
    candidates (the top-k after the repetition penalty, which the warpers never reorder, plus the
    drawn or forced token), so a plot can show a cut token where it was; the tokens each stage
    keeps and the share of the previous stage's probability they hold (tracer.sampling's
    ``kept`` and ``mass_kept``); the tokens left with non-zero probability; the logits' sum
    (finite if every logit is, barring fp32 overflow, which the exact check clears); the drawn id.
    ``cat`` promotes ids and counts to float32, exact below 2**24. Batch 1, so counts run over the
    whole [1, V] (count_nonzero with dim= takes three times as long).
    """

    def __init__(self, stages, drawn, force_id, k: int) -> None:
        distinct = {id(stages[n]): stages[n] for n in sampling.STAGES[:-1]}  # insertion order = rows
        self.row_of = {key: i for i, key in enumerate(distinct)}
        U = len(distinct)
        scores = stages["raw"] if U == 1 else torch.cat(list(distinct.values()))  # [U, V]
        top = torch.topk(scores, k)  # [U, k]
        softmaxes = stages["final"] if U == 1 else torch.softmax(scores, dim=-1)  # [U, V]
        cand = top.indices[self.row_of[id(stages["repetition_penalty"])]]
        chosen = drawn if force_id is None else torch.tensor(force_id, device=scores.device)
        if chosen is not None:
            cand = torch.cat([cand, chosen.view(1)])
        at = cand.expand(U, -1)
        parts = [top.indices, top.values, softmaxes.gather(-1, top.indices), scores.gather(-1, at),
                 softmaxes.gather(-1, at), sampling.kept(scores), sampling.mass_kept(softmaxes[:-1], scores[1:]),
                 torch.count_nonzero(stages["final"]), stages["raw"].sum()]
        if drawn is not None:
            parts.append(drawn)
        host = torch.cat([p.reshape(-1) for p in parts]).tolist()  # the one device -> host copy
        m = cand.numel()
        ids, vals, probs, at_s, at_p, kept, mass, rest = _split(host, [U * k] * 3 + [U * m] * 2 + [U, U - 1])
        self.rows = [(list(map(int, ids[r * k:(r + 1) * k])), vals[r * k:(r + 1) * k], probs[r * k:(r + 1) * k])
                     for r in range(U)]
        self._at = [(at_s[r * m:(r + 1) * m], at_p[r * m:(r + 1) * m]) for r in range(U)]
        self._kept, self._mass = [int(n) for n in kept], mass
        self.nonzero, self.total = int(rest[0]), rest[1]
        self.drawn = int(rest[2]) if drawn is not None else None

    def top(self, stage_scores) -> dict[str, list]:
        ids, vals, probs = self.rows[self.row_of[id(stage_scores)]]
        return {"ids": ids, "scores": vals, "probs": probs}

    def at_candidates(self, stages, chosen_id: int) -> tuple[list[int], dict[str, dict[str, list]]]:
        """The candidate ids and each stage's scores and probabilities there; the chosen token's
        extra column is dropped when it is among the top-k already."""
        ids = self.rows[self.row_of[id(stages["repetition_penalty"])]][0]
        # (A greedy pick outside the top-k, a tie at the top with top_k=1, has no column: left out.)
        m = min(len(ids) + (chosen_id not in ids), len(self._at[0][0]))
        out = {}
        for name in sampling.STAGES[:-1]:
            s, p = self._at[self.row_of[id(stages[name])]]
            out[name] = {"scores": s[:m], "probs": p[:m]}
        last = out[sampling.STAGES[-2]]["probs"]
        out[sampling.STAGES[-1]] = {"scores": last, "probs": last}
        return (ids + [chosen_id])[:m], out

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


def _split(flat: list, sizes: list[int]) -> list[list]:
    """``flat`` cut into consecutive pieces of the given sizes, then the rest."""
    out, start = [], 0
    for n in sizes:
        out.append(flat[start:start + n])
        start += n
    return [*out, flat[start:]]


class _Recorder:
    """Attaches the capture hooks for one forward and detaches them after."""

    def __init__(self, decoder: Decoder, T: int) -> None:
        self.d, self.T = decoder, T
        self.tensors: dict[str, torch.Tensor] = {}
        self.resid: dict[int, torch.Tensor] = {}
        self._ctx = []

    def __enter__(self) -> _Recorder:
        d, model = self.d, self.d.model
        opts = d.capture
        if opts.policy == "full" and opts.points:
            names = model.hooks.select(opts.points)
            S = d.cache.length + self.T
            shapes = point_shapes(model.config, self.T, S)
            need = sum(_numel(shapes[n]) for n in names) * model.embed.weight.element_size()
            if d._captured_bytes + need > opts.budget_bytes:
                raise TraceError(
                    f"capture budget exceeded: this step's {len(names)} hook point(s) need "
                    f"{need / 1e6:.1f} MB on top of {d._captured_bytes / 1e6:.1f} MB already kept, "
                    f"over budget_bytes={opts.budget_bytes / 1e6:.1f} MB. Raise the budget, select "
                    "fewer points (e.g. 'blocks.0.attn.pattern'), or use capture='light'"
                )
            d._captured_bytes += need

            def keep(x, point):
                self.tensors[point.name] = x.detach().to("cpu", copy=True)

            self._ctx.append(model.hooks.attach(names, keep))
        if opts.lens:
            def last_resid(x, point):
                self.resid[int(point.name.split(".")[1])] = x[0, -1].detach()

            self._ctx.append(model.hooks.attach("blocks.*.resid_post", last_resid))
        for c in self._ctx:
            c.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for c in reversed(self._ctx):
            c.__exit__(*exc)

    def fill_lens(self, event: ForwardEvent, model: LlamaModel, k: int) -> None:
        """Logit lens: each layer's last-position residual through final norm and lm_head."""
        if not self.resid:
            return
        layers = sorted(self.resid)
        h = torch.stack([self.resid[i] for i in layers])  # [L, D]
        probs = torch.softmax(model.unembed(h).float(), dim=-1)  # [L, V]
        top = torch.topk(probs, min(k, probs.shape[-1]))
        norms = h.float().norm(dim=-1)
        ids, vals, norms = top.indices.cpu().tolist(), top.values.cpu().tolist(), norms.cpu().tolist()
        event.residual_norms = norms
        event.logit_lens = [{"layer": i, "ids": ids[j], "probs": vals[j]} for j, i in enumerate(layers)]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


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
