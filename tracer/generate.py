"""Stages 5-7 of the walkthrough as a state machine: prefill, then (sample, decode_step) per token.

:class:`Decoder` holds one generation's state (ids so far, KV cache, random generator) and
advances one token per :meth:`Decoder.step`, so a notebook can step it, change the sampling
knobs between steps, or branch with a token of the user's choosing. ``generate`` is the plain loop.

Per step: (first step) prefill the prompt, else feed the last token through the cache; then run the
sampling stages and choose. The next forward happens only when the next token is asked for, so the
trace reads prefill, sample, (decode_step, sample) x (n - 1).

Tracing stays out of the hot path: ``capture="off"`` records nothing; ``"light"`` takes each
stage's top-k on the device and copies it to the host once per step; ``"full"`` also keeps tensors
at the chosen hook points, within a byte budget checked before each forward.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from . import sampling
from .errors import GenerationError, NumericsError, TraceError
from .hooks import point_shapes
from .model import KVCache, LlamaModel
from .trace import (
    CAPTURE_POLICIES,
    DecodeStepEvent,
    ForwardEvent,
    PrefillEvent,
    SampleEvent,
    Trace,
    memory_snapshot,
)

DEFAULT_BUDGET_BYTES = 512 * 1024**2  # full capture: refuse beyond this unless raised


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
        fast_forward=None,
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
        # capture="off" may run a compiled forward (same math, fused kernels); traced runs stay eager.
        self.fast_forward = fast_forward if fast_forward is not None else model
        self.history: list[StepRecord] = []
        self.finish_reason: str | None = None
        self.seed = seed
        self.generator = torch.Generator(device=model.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        # Sized for what this generation can reach, not for max_position_embeddings.
        self.cache: KVCache = model.new_cache(total)
        # All ids (prompt + generated) on the device, for the repetition penalty without a copy.
        self._id_buf = torch.zeros(total, dtype=torch.long, device=model.device)
        self._id_buf[: len(prompt_ids)] = torch.tensor(prompt_ids)
        self._captured_bytes = 0
        self._settings_json: tuple = (None, {})

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
        x = torch.tensor([ids], device=self.model.device)
        policy = self.capture.policy
        if policy == "off":
            forward = self.model if self.model.hooks.any_active else self.fast_forward
            return forward(x, self.cache, last_only=True)[0, -1]  # checked in _sample
        started, t0 = time.time(), time.perf_counter()
        start = self.cache.length
        with _Recorder(self, len(ids)) as rec:
            logits = self.model(x, self.cache, last_only=True)[0, -1]
        self._check_finite(logits, step)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        cls = PrefillEvent if first else DecodeStepEvent
        event = cls(
            time=started,
            seconds=time.perf_counter() - t0,
            step=step,
            positions=[start, start + len(ids) - 1],
            input_ids=list(ids),
            kv_cache=_cache_summary(self.cache),
            memory=memory_snapshot(self.model.device),
            tensors=rec.tensors,
        )
        rec.fill_lens(event, self.model, self.capture.top_k)
        # top_logits is filled from the sample stage's "raw" top-k (the same numbers, one copy).
        self.trace.add(event)
        return logits.float()

    def _sample(self, logits: torch.Tensor, force_id: int | None) -> StepRecord:
        step = len(self.new_ids)
        s = self.settings
        prev = self._id_buf[None, : len(self.prompt_ids) + step]  # every id so far, on the device
        if self.capture.policy == "off":
            return self._sample_untraced(logits, prev, force_id, step)
        t0, started = time.perf_counter(), time.time()
        stages = sampling.stage_scores(logits[None], prev, s)
        probs = stages["final"][0]
        if force_id is None:
            # Greedy: argmax of the processed scores, as transformers does (not of the softmax).
            pick = probs if s.do_sample else stages["top_p"][0]
            token = sampling.choose(pick[None], do_sample=s.do_sample, generator=self.generator)[0]
        else:
            token = torch.tensor(force_id, device=probs.device)
        chosen_p = probs[token]
        rank = (probs > chosen_p).sum()
        token_id, prob, rank_i = self._record_sample(stages, token, chosen_p, rank, step, force_id, started, t0)
        return self._append(StepRecord(step, token_id, prob, rank_i, force_id is not None))

    def _sample_untraced(self, logits, prev, force_id, step) -> StepRecord:
        """capture="off": the sampling chain, nothing kept, one host sync for id + finiteness."""
        if force_id is None:
            token = sampling.next_token(logits[None], prev, self.settings, self.generator)[0]
        else:
            token = torch.tensor(force_id, device=logits.device)
        token_id, finite = torch.stack([token, torch.isfinite(logits).all().long()]).tolist()
        if not finite:
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

    def _record_sample(self, stages, token, chosen_p, rank, step, force_id, started, t0):
        k = min(self.capture.top_k, stages["raw"].shape[-1])
        rows, done = [], {}
        for name in sampling.STAGES:
            stage = stages[name]
            if id(stage) not in done:  # greedy passes one tensor through several stages: rank it once
                scores = stage[0]
                p = scores if name == "final" else torch.softmax(scores, dim=-1)
                top = torch.topk(scores, k)
                done[id(stage)] = torch.stack([top.indices.to(p.dtype), top.values, p[top.indices]])
            rows.append(done[id(stage)])
        n_left = (stages["final"][0] > 0).sum()
        extra = torch.stack([token.to(chosen_p.dtype), chosen_p, rank.to(chosen_p.dtype), n_left.to(chosen_p.dtype)])
        # One device -> host copy per step for everything the event shows.
        host = torch.cat([torch.stack(rows).flatten(), extra]).tolist()
        token_id, prob, rank_i, n_left_i = int(host[-4]), host[-3], int(host[-2]), int(host[-1])
        stage_table = {}
        for i, name in enumerate(sampling.STAGES):
            base = i * 3 * k
            stage_table[name] = {
                "ids": [int(x) for x in host[base : base + k]],
                "scores": host[base + k : base + 2 * k],
                "probs": host[base + 2 * k : base + 3 * k],
            }
        if self._settings_json[0] is not self.settings:  # settings are frozen: convert once per change
            self._settings_json = (self.settings, asdict(self.settings))
        event = SampleEvent(
            time=started,
            step=step,
            settings=dict(self._settings_json[1]),
            stages=stage_table,
            candidates=n_left_i,
            chosen_id=token_id,
            chosen_piece=self.piece(token_id),
            chosen_rank=rank_i,
            chosen_prob=prob,
            forced=force_id is not None,
        )
        event.seconds = time.perf_counter() - t0
        forward = self.trace.events[-1]
        if isinstance(forward, ForwardEvent) and forward.step == step:
            forward.top_logits = {"ids": event.stages["raw"]["ids"], "values": event.stages["raw"]["scores"]}
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
        recomputed except the step itself.
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
        other.generator = torch.Generator(device=self.model.device)
        other.generator.set_state(self.generator.get_state())
        other._captured_bytes = 0
        other.step(force_id=token_id)
        return other


# ---------------------------------------------------------------------------------------------
# Helpers


def _cache_summary(cache: KVCache) -> dict:
    return {
        "length": cache.length,
        "max_len": cache.max_len,
        "shape_per_layer": [int(cache.k.shape[1]), int(cache.k.shape[2]), cache.length, int(cache.k.shape[4])],
        "bytes_used": cache.bytes_used(),
        "bytes_allocated": cache.bytes_allocated,
    }


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
