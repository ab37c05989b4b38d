"""The stepping app of notebook 05: one token per click, every sampling stage shown, branches.

:class:`StepperApp` drives a :class:`tracer.generate.Decoder`; all state lives on the app (the
decoders, the last error), so tests drive it in-process with ``button.click()`` and ``.value = ...``.
ipywidgets swallows exceptions raised in callbacks, so every action stores its exception in
``app.last_error``, shows it in the app's error label, and re-raises it.
"""

from __future__ import annotations

import base64
import functools
import html
import struct
from dataclasses import replace

import ipywidgets as W

from .. import sampling
from ..knobs import DO_SAMPLE, KNOBS, REPETITION_PENALTY, SWITCH, TEMPERATURE, TOP_K, TOP_P, Knob
from ..trace import SampleEvent
from .plots import compare_steps, new_figure, sampling_stages, to_png
from .tokens import quoted

BRANCH_NAMES = ("A", "B")
# The knobs greedy decoding ignores: those of the stages it skips (the warpers of sampling.CHAIN).
GREEDY_IGNORES = tuple(k.name for k in KNOBS if k.name in sampling.STAGES and k.name not in sampling.GREEDY_STAGES)
NO_STEP = "no token yet"  # the step label before the first step
TEXT_LINES = 4  # lines of text on show above the panels (the rest scrolls)


def show_png(out: W.Output, fig) -> None:
    """Replace an Output's content with the figure as a PNG (works in a kernel and in plain Python).

    The figure's title is the image's text (what a reader without the image gets, and what tests
    read); the box keeps at least the image's height while the new one loads, so nothing jumps."""
    png = to_png(fig)
    width, height = struct.unpack(">II", png[16:24])  # the PNG's IHDR chunk: pixels
    title = fig._suptitle.get_text() if fig._suptitle is not None else ""
    out.layout.min_height = f"{height}px"
    out.outputs = ({"output_type": "display_data", "metadata": {},
                    "data": {"image/png": base64.b64encode(png).decode("ascii"),
                             "text/plain": title or f"<Figure {width}x{height} px>"}},)


def token_texts(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> list[str]:
    """What each new token adds to the decoded text (leading spaces included).

    A token that adds nothing printable on its own (a special token, or one byte of a multi-byte
    character) is shown as its vocabulary piece (``</s>``, ``<0xF0>``)."""
    out = []
    ids = list(prompt_ids)
    prev = tokenizer.decode(ids)
    for i in new_ids:
        ids.append(i)
        cur = tokenizer.decode(ids)
        added = cur[len(prev):] if cur.startswith(prev) else ""
        if added and "\ufffd" not in added:
            out.append(added)
            prev = cur
        else:
            out.append(tokenizer.id_to_piece(i))
    return out


def prob_colour(p: float) -> str:
    """Background for a token: red (improbable) through yellow to green (probable)."""
    p = min(max(p, 0.0), 1.0) if p == p else 0.0
    return f"hsl({int(120 * p ** 0.5)}, 85%, 82%)"


def tokens_html(tokenizer, prompt_ids, history, new_ids, *, cls: str = "tracer-token") -> str:
    """The prompt, then each generated token in a span coloured by its probability."""
    parts = [f"<span class='tracer-prompt' style='color:#555'>{html.escape(tokenizer.decode(prompt_ids))}</span>"]
    for text, rec in zip(token_texts(tokenizer, prompt_ids, new_ids), history, strict=True):
        core = text.lstrip()
        lead = text[: len(text) - len(core)]
        if not core:  # whitespace only: a visible mark in the span, the whitespace itself after it
            core, lead, after = text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥"), "", text
        else:
            after = ""
        tip = (f"step {rec.step}: id {rec.token_id} {tokenizer.id_to_piece(rec.token_id)!r}, "
               f"p={rec.prob:.3f}, rank {rec.rank}" + (", chosen by you" if rec.forced else ""))
        border = "border-bottom:2px solid #d62728;" if rec.forced else ""
        parts.append(f"{html.escape(lead)}<span class='{cls}' title='{html.escape(tip, quote=True)}' "
                     f"style='background:{prob_colour(rec.prob)};border-radius:3px;{border}'>"
                     f"{html.escape(core)}</span>{html.escape(after)}")
    body = "".join(parts)
    # At most TEXT_LINES lines, scrolled to the end (column-reverse): the newest token stays in
    # view as the text grows, and the panels below do not move down.
    return (f"<div style='font-family:monospace;line-height:1.7;max-height:{1.7 * TEXT_LINES}em;"
            "overflow-y:auto;display:flex;flex-direction:column-reverse'>"
            f"<div style='white-space:pre-wrap'>{body}</div></div>")


def knob_widget(knob: Knob, value) -> W.ValueWidget:
    """The stepper's widget for one sampling knob (``tracer/knobs.py``): a toggle for the switch
    (do_sample), a slider over the knob's declared range for a number."""
    if knob.words:
        return W.ToggleButtons(options=[word for word, _ in knob.words], value=knob.word(value),
                               tooltips=[meaning for _, meaning in knob.words],
                               description=knob.label).add_class("tracer-mode")
    low, high, step = knob.slider
    slider = W.IntSlider if knob.type is int else W.FloatSlider
    return slider(value=value, min=low, max=high, step=step, description=knob.label, continuous_update=False,
                  style={"description_width": "125px"}, layout=W.Layout(width="340px"),
                  ).add_class("tracer-" + knob.flag.removeprefix("--"))


def knob_value(knob: Knob, widget: W.ValueWidget):
    """The knob's value as its widget (from :func:`knob_widget`) sets it."""
    return widget.value == knob.word(True) if knob.words else widget.value


def sample_events(decoder) -> dict[int, SampleEvent]:
    """step -> its ``sample`` event."""
    return {e.step: e for e in decoder.trace.events if isinstance(e, SampleEvent)}


def _guarded(method):
    """Run an action; on failure show the error in the app, keep it on ``last_error``, re-raise."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if self._busy:  # a second click while working: ignore
            return None
        self._busy = True
        self._enable(False)
        try:
            result = method(self, *args, **kwargs)
            self.error.value = ""
            return result
        except Exception as exc:
            self.last_error = exc
            self.error.value = (f"<span style='color:#b00'><b>{html.escape(type(exc).__name__)}</b>: "
                                f"{html.escape(str(exc))}</span>")
            raise
        finally:
            self._busy = False
            self._enable(True)

    return run


class StepperApp:
    """Generate one token at a time and watch the sampling stages; change knobs; branch.

    ``app`` as a cell's last value displays the app (``app.widget`` is the ipywidgets box).
    """

    def __init__(self, llm, prompt, *, max_new_tokens: int = 60, do_sample: bool = True,
                 temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                 repetition_penalty: float = 1.1, seed: int = 0, top: int = 10, run_n: int = 10,
                 chat: bool = False, system: str | None = None) -> None:
        """``prompt``, ``chat`` and ``system`` as :meth:`tracer.api.Llama.decoder` takes them (text
        or ids; ``chat=True``: the text is the user's turn in the model's chat template, after the
        ``system`` prompt if given); the knobs start at the values given; ``top`` tokens per panel;
        ``run_n`` tokens per press of Run."""
        self.llm, self.prompt, self.max_new_tokens, self.top, self.run_n = llm, prompt, max_new_tokens, top, run_n
        self.chat, self.system = chat, system
        self.last_error: Exception | None = None
        self.branches: dict = {}
        self.branch_step: int | None = None  # where B left A
        self._busy = False
        self._build_controls()
        self._build_knobs(((DO_SAMPLE, do_sample), (TEMPERATURE, temperature), (TOP_K, top_k),
                           (TOP_P, top_p), (REPETITION_PENALTY, repetition_penalty)), seed)
        self._build_branching()
        self._connect()
        self.widget = self._layout()
        self._knob_sync()
        self.reset()

    # --- building the widgets -----------------------------------------------------------------
    def _build_controls(self) -> None:
        """The buttons, the progress bar, the labels and the text and plot areas."""
        self.next_button = W.Button(description="Next token", icon="step-forward").add_class("tracer-next")
        self.run_button = W.Button(description=f"Run {self.run_n}", icon="forward").add_class("tracer-run10")
        self.reset_button = W.Button(description="Reset", icon="undo").add_class("tracer-reset")
        self.progress = W.IntProgress(value=0, min=0, max=self.run_n, description="",
                                      layout=W.Layout(width="160px", visibility="hidden"))
        self.step_label = W.Label(NO_STEP).add_class("tracer-step-count")
        self.status = W.Label("")
        self.error = W.HTML("").add_class("tracer-error")
        self.text = W.HTML("").add_class("tracer-text")
        self.plot = W.Output().add_class("tracer-dist-plot")

    def _build_knobs(self, given: tuple[tuple[Knob, object], ...], seed: int) -> None:
        """One widget per sampling knob, in the declared order (tracer/knobs.py; tests check the
        names), and the seed."""
        self.knob_widgets = {k.name: knob_widget(k, value) for k, value in given}
        self.mode, self.temperature, self.top_k, self.top_p, self.repetition_penalty = self.knob_widgets.values()
        self.seed = W.IntText(value=seed, description="seed (restarts)", style={"description_width": "initial"},
                              layout=W.Layout(width="180px")).add_class("tracer-seed")

    def _build_branching(self) -> None:
        """Picking another token at a step, the branch to continue, and the two branches compared."""
        wide = {"style": {"description_width": "initial"}}  # the description in full, never cut
        self.at_step = W.Dropdown(description="at", options=[], layout=W.Layout(width="250px"),
                                  **wide).add_class("tracer-at-step")
        self.candidates = W.Dropdown(description="take instead", options=[], layout=W.Layout(width="330px"),
                                     **wide).add_class("tracer-candidates")
        self.branch_button = W.Button(description="Branch", icon="code-fork").add_class("tracer-branch")
        self.active = W.ToggleButtons(options=["A"], description="continue", style={"button_width": "50px"})
        self.compare_text = W.HTML("").add_class("tracer-compare-text")
        self.compare_step = W.Dropdown(description="compare", options=[], layout=W.Layout(width="460px"),
                                       **wide).add_class("tracer-compare-step")
        self.compare_plot = W.Output().add_class("tracer-compare-plot")
        self.compare_box = W.VBox([W.HTML("<b>Branches side by side</b>"), self.compare_text,
                                   self.compare_step, self.compare_plot],
                                  layout=W.Layout(display="none"))

    def _connect(self) -> None:
        """Each widget's action."""
        self.next_button.on_click(lambda _: self.next_token())
        self.run_button.on_click(lambda _: self.run())
        self.reset_button.on_click(lambda _: self.reset())
        self.branch_button.on_click(lambda _: self.branch())
        for w in self.knob_widgets.values():
            w.observe(self._on_knob, names="value")
        self.seed.observe(lambda _: self.reset(), names="value")
        self.at_step.observe(lambda _: self._fill_candidates(), names="value")
        self.active.observe(self._on_active, names="value")
        # While an action renders, it draws the comparison once itself (menus refilled there fire too).
        self.compare_step.observe(lambda _: None if self._busy else self._draw_compare(), names="value")

    def _layout(self) -> W.VBox:
        """The app, top to bottom: controls, errors, knobs, the text, the panels, branching."""
        legend = W.HTML("<small>Token colour: probability of the chosen token under the final "
                        "distribution, red (unlikely) to green (likely); hover for its step, id, p and "
                        "rank; underlined = chosen by you. Steps count from 0, as in the trace.</small>")
        controls = W.HBox([self.next_button, self.run_button, self.reset_button, self.progress,
                           self.step_label, self.status])
        knobs = W.HBox([W.VBox([self.temperature, self.top_k]), W.VBox([self.top_p, self.repetition_penalty]),
                        W.VBox([self.mode, self.seed])])
        branch_row = W.HBox([self.at_step, self.candidates, self.branch_button, self.active])
        return W.VBox([controls, self.error, knobs, self.text, legend, self.plot,
                       W.HTML("<b>Pick a different token and continue from there</b>"), branch_row,
                       self.compare_box]).add_class("tracer-stepper")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # --- state --------------------------------------------------------------------------------
    @property
    def decoder(self):
        """The decoder that Next token / Run advance (the active branch)."""
        return self.branches[self.active.value]

    @property
    def step_count(self) -> int:
        return len(self.decoder.new_ids)

    def knobs(self) -> dict:
        """The sampling knobs as the widgets set them, by name."""
        return {k.name: knob_value(k, self.knob_widgets[k.name]) for k in KNOBS}

    # --- actions ------------------------------------------------------------------------------
    @_guarded
    def reset(self) -> None:
        """Start again from the prompt with the current knobs and seed (drops branches)."""
        dec = self.llm.decoder(self.prompt, chat=self.chat, system=self.system, max_new_tokens=self.max_new_tokens,
                               seed=self.seed.value, top_n=max(self.top, 20), **self.knobs())
        self.branches = {"A": dec}
        self.branch_step = None
        self.active.options = ["A"]
        self.active.value = "A"
        self._render()

    @_guarded
    def next_token(self) -> None:
        self._step()
        self._render()

    @_guarded
    def run(self, n: int | None = None) -> None:
        """Up to ``n`` (default ``run_n``) tokens, with a progress bar."""
        n = self.run_n if n is None else n
        self.progress.max, self.progress.value = n, 0
        self.progress.layout.visibility = "visible"
        try:
            for i in range(n):
                if self.decoder.finished:
                    break
                self._step()
                self.progress.value = i + 1
        finally:
            self.progress.layout.visibility = "hidden"
        self._render()

    @_guarded
    def branch(self, step: int | None = None, token_id: int | None = None) -> None:
        """Take ``token_id`` at ``step`` instead (defaults: the dropdowns) in a new branch, made active."""
        step = self.at_step.value if step is None else step
        token_id = self.candidates.value if token_id is None else token_id
        if step is None or token_id is None:
            raise ValueError("take a step first: there is nothing to branch from yet")
        source = self.active.value
        other = BRANCH_NAMES[1 - BRANCH_NAMES.index(source)]
        self.branches[other] = self.decoder.branch(step, token_id)
        self.branch_step = step
        self.active.options = list(BRANCH_NAMES)
        self.active.value = other  # triggers _on_active -> _render
        self._render()

    def _step(self) -> None:
        if self.decoder.finished:
            raise RuntimeError(f"branch {self.active.value} has finished ({self.decoder.finish_reason}); "
                               "press Reset or branch at an earlier step")
        self.decoder.step()

    # --- callbacks ----------------------------------------------------------------------------
    def _on_knob(self, change) -> None:
        self._knob_sync()
        self._apply_knobs()

    @_guarded
    def _apply_knobs(self) -> None:
        knobs = self.knobs()
        for dec in self.branches.values():
            dec.settings = replace(dec.settings, **knobs)

    def _knob_sync(self) -> None:
        greedy = not knob_value(SWITCH, self.knob_widgets[SWITCH.name])
        for name in GREEDY_IGNORES:
            self.knob_widgets[name].disabled = greedy  # greedy: argmax after the repetition penalty

    def _on_active(self, change) -> None:
        if not self._busy:
            self._guarded_render()

    @_guarded
    def _guarded_render(self) -> None:
        self._render()

    def _enable(self, on: bool) -> None:
        finished = bool(self.branches) and self.decoder.finished
        self.next_button.disabled = self.run_button.disabled = (not on) or finished
        self.reset_button.disabled = not on
        # Nothing to branch from before the first step.
        self.branch_button.disabled = (not on) or not (self.branches and self.step_count)

    # --- drawing ------------------------------------------------------------------------------
    def _piece(self, i: int) -> str:
        return self.llm.tokenizer.id_to_piece(i)

    def _quoted(self, i: int) -> str:
        """A token for a dropdown or a label: the one renderer (tracer.viz.tokens), between marks."""
        return quoted(self._piece(i), byte_level=self.llm.tokenizer.byte_level)

    def stage_figure(self, event: SampleEvent):
        """The stage panels of one ``sample`` event, as the app shows them."""
        return sampling_stages(event, self._piece, top=self.top, byte_level=self.llm.tokenizer.byte_level)

    def _render(self) -> None:
        dec, tok = self.decoder, self.llm.tokenizer
        n = len(dec.new_ids)
        # One numbering everywhere: a token's step, from 0 as in the trace (step 0 samples from
        # the prefill's logits). The label names the step whose panels are shown.
        self.step_label.value = f"step {n - 1}" if n else NO_STEP
        names = list(self.branches)
        self.status.value = (f"branch {self.active.value} of {'/'.join(names)}" if len(names) > 1 else "") + (
            f"  finished: {dec.finish_reason}" if dec.finished else "")
        # The text first: each assignment reaches the browser at once, before the figure is drawn.
        self.text.value = tokens_html(tok, dec.prompt_ids, dec.history, dec.new_ids)
        if n:
            fig = self.stage_figure(sample_events(dec)[n - 1])
        else:
            fig = new_figure(8, 1.2)
            # Bold, like the panels' titles: the first click then finds that font loaded.
            fig.text(0.5, 0.5, f"{len(dec.prompt_ids)} prompt tokens ready. Press 'Next token': the prefill "
                     "runs, then the sampling stages appear here.", ha="center", va="center", fontweight="bold")
        show_png(self.plot, fig)
        self.at_step.options = [(f"step {s}: {self._quoted(dec.new_ids[s])}", s) for s in range(n)]
        self.at_step.value = n - 1 if n else None
        self._fill_candidates()
        self._render_compare()

    def _fill_candidates(self) -> None:
        step = self.at_step.value
        ev = sample_events(self.decoder).get(step) if step is not None else None
        if ev is None:
            self.candidates.options = []
            return
        final = ev.stages[sampling.FINAL.name]
        opts = [(f"{self._quoted(i)}  p={p:.3f}" + ("  (taken)" if i == ev.chosen_id else ""), i)
                for i, p in zip(final["ids"][: self.top], final["probs"][: self.top], strict=True)]
        self.candidates.options = opts
        others = [i for _, i in opts if i != ev.chosen_id]
        self.candidates.value = others[0] if others else opts[0][1]

    def _render_compare(self) -> None:
        if len(self.branches) < 2:
            self.compare_box.layout.display = "none"
            return
        self.compare_box.layout.display = "flex"
        tok = self.llm.tokenizer
        cols = "".join(
            f"<td style='vertical-align:top;width:50%;padding:4px'><b>{name}</b>"
            f"{' (active)' if name == self.active.value else ''}: {len(d.new_ids)} tokens"
            f"{tokens_html(tok, d.prompt_ids, d.history, d.new_ids, cls='tracer-cmp-token')}</td>"
            for name, d in self.branches.items())
        self.compare_text.value = f"<table style='width:100%'><tr>{cols}</tr></table>"
        a, b = (self.branches[n] for n in BRANCH_NAMES)
        steps = self.differing_steps()
        old = self.compare_step.value
        self.compare_step.options = [
            (f"step {s}: A {self._quoted(a.new_ids[s])} | B {self._quoted(b.new_ids[s])}", s) for s in steps]
        self.compare_step.value = old if old in steps else (steps[0] if steps else None)
        self._draw_compare()

    def differing_steps(self) -> list[int]:
        """Steps both branches have taken from the branch point on (their contexts differ there)."""
        if len(self.branches) < 2 or self.branch_step is None:
            return []
        a, b = (self.branches[n] for n in BRANCH_NAMES)
        return list(range(self.branch_step, min(len(a.new_ids), len(b.new_ids))))

    def _draw_compare(self) -> None:
        step = self.compare_step.value
        if step is None or len(self.branches) < 2:
            self.compare_plot.outputs = ()
            return
        ev_a, ev_b = (sample_events(self.branches[n])[step] for n in BRANCH_NAMES)
        show_png(self.compare_plot, compare_steps(ev_a, ev_b, self._piece, top=self.top,
                                                  byte_level=self.llm.tokenizer.byte_level))
