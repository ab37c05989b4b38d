"""StepperApp driven in-process: buttons clicked, sliders moved, state checked."""

from __future__ import annotations

import re

import pytest
from test_viz import viz_checkpoint

from tracer.errors import GenerationError
from tracer.viz import StepperApp
from tracer.viz.widgets import NO_STEP, token_texts, tokens_html


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return viz_checkpoint(tmp_path_factory)


def n_tokens(app) -> int:
    return app.text.value.count("class='tracer-token'")


def step_number(app) -> int | None:
    """The step the header names (steps count from 0, as in the trace); None before the first."""
    if app.step_label.value == NO_STEP:
        return None
    return int(re.fullmatch(r"step (\d+)", app.step_label.value).group(1))


def test_css_classes_and_initial_state(llm):
    app = StepperApp(llm, "It is a truth", max_new_tokens=20, seed=0)
    classes = {c for w in (app.next_button, app.run_button, app.reset_button, app.branch_button, app.text,
                           app.plot, app.step_label) for c in w._dom_classes}
    assert {"tracer-next", "tracer-run10", "tracer-reset", "tracer-branch", "tracer-text",
            "tracer-dist-plot", "tracer-step-count"} <= classes
    assert step_number(app) is None and n_tokens(app) == 0
    assert app.plot.outputs[0]["data"]["image/png"]  # a placeholder image before the first step
    assert app.branch_button.disabled  # nothing to branch from yet
    app.next_button.click()
    assert not app.branch_button.disabled
    assert "application/vnd.jupyter.widget-view+json" in app._repr_mimebundle_()
    assert app.last_error is None


def test_next_run_branch_reset(llm):
    app = StepperApp(llm, "It is a truth", max_new_tokens=30, seed=0)
    for i in range(1, 3):  # one token per click; the plot image changes each time
        before = app.plot.outputs
        app.next_button.click()
        assert step_number(app) == i - 1 and n_tokens(app) == i and len(app.decoder.new_ids) == i
        assert app.plot.outputs != before and app.plot.outputs[0]["data"]["image/png"]
    app.run_button.click()
    assert step_number(app) == 11 and n_tokens(app) == 12 and app.progress.max == 10

    # Branch at step 5 with a token other than the one taken.
    a = app.branches["A"]
    app.at_step.value = 5
    assert app.candidates.value != a.new_ids[5]
    token = app.candidates.value
    app.branch_button.click()
    assert set(app.branches) == {"A", "B"} and app.active.value == "B"
    b = app.branches["B"]
    assert b.new_ids[:5] == a.new_ids[:5] and b.new_ids[5] == token != a.new_ids[5]
    assert step_number(app) == 5 and n_tokens(app) == 6  # the text shows the active branch
    assert app.compare_box.layout.display == "flex"
    assert app.compare_text.value.count("tracer-cmp-token") == 12 + 6
    assert app.compare_step.value == 5 and app.compare_plot.outputs
    app.next_button.click()  # continues B
    assert len(b.new_ids) == 7 and len(a.new_ids) == 12 and app.differing_steps() == [5, 6]
    app.active.value = "A"
    assert step_number(app) == 11

    app.reset_button.click()
    assert step_number(app) is None and n_tokens(app) == 0 and list(app.branches) == ["A"]
    assert app.branch_button.disabled
    assert app.compare_box.layout.display == "none"
    assert app.last_error is None


def test_knobs_reach_the_decoder_settings(llm):
    app = StepperApp(llm, "It is a truth", max_new_tokens=10, seed=0)
    app.temperature.value = 0.5
    app.top_k.value = 7
    app.top_p.value = 0.8
    app.repetition_penalty.value = 1.5
    s = app.decoder.settings
    assert (s.do_sample, s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (True, 0.5, 7, 0.8, 1.5)
    app.next_button.click()
    assert app.decoder.trace.of("sample")[-1].settings["top_k"] == 7
    app.mode.value = "greedy"
    assert app.decoder.settings.do_sample is False and app.temperature.disabled
    app.next_button.click()
    ev = app.decoder.trace.of("sample")[-1]
    assert ev.chosen_rank == 0 and ev.settings["do_sample"] is False
    app.seed.value = 3  # a new seed restarts
    assert step_number(app) is None and app.decoder.seed == 3 and app.decoder.settings.do_sample is False
    assert app.last_error is None


def test_same_seed_same_tokens(llm):
    a, b = (StepperApp(llm, "It is a truth", max_new_tokens=10, seed=1) for _ in range(2))
    a.run(5)
    b.run(5)
    assert a.decoder.new_ids == b.decoder.new_ids


def test_errors_are_shown_kept_and_raised(llm):
    app = StepperApp(llm, "It is a truth", max_new_tokens=2, seed=0)
    app.run_button.click()  # stops at max_new_tokens
    assert step_number(app) == 1 and app.next_button.disabled and "finished" in app.status.value
    with pytest.raises(RuntimeError, match="finished"):
        app.next_token()
    assert isinstance(app.last_error, RuntimeError) and "finished" in app.error.value
    with pytest.raises(Exception, match="branch"):
        app.branch(step=9, token_id=5)
    assert "branch" in app.error.value.lower()


def test_token_texts_and_html(llm):
    tok = llm.tokenizer
    prompt = tok.encode("Hello")
    new = tok.encode(" the world 🦙", add_bos=False) + [tok.eos_id]
    texts = token_texts(tok, prompt, new)
    assert len(texts) == len(new) and texts[-1] == "</s>"
    assert "".join(texts[:-1]).replace("<0x", "").strip().startswith("the")

    class Rec:
        step, token_id, prob, rank, forced = 0, 5, 0.5, 0, True

    out = tokens_html(tok, prompt, [Rec()], [tok.encode(" x", add_bos=False)[-1]])
    assert out.count("class='tracer-token'") == 1 and "chosen by you" in out


def test_one_step_numbering_everywhere(llm):
    """Header, panel title, branch menus and token tooltips name a token by the same step (from 0,
    the trace's ``step``)."""
    app = StepperApp(llm, "It is a truth", max_new_tokens=10, seed=0)
    for _ in range(3):
        app.next_button.click()
    last = app.decoder.trace.of("sample")[-1].step
    assert last == 2 and step_number(app) == last
    assert app.plot.outputs[0]["data"]["text/plain"].startswith(f"step {last}: ")  # the figure's title
    assert [v for _, v in app.at_step.options] == [0, 1, 2]
    assert [text.split(":")[0] for text, _ in app.at_step.options] == ["step 0", "step 1", "step 2"]
    assert re.findall(r"title='step (\d+):", app.text.value) == ["0", "1", "2"]
    app.at_step.value = 1
    app.branch_button.click()
    app.next_button.click()
    (label, value), *_ = app.compare_step.options
    assert value == 1 and label.startswith("step 1: A ")
    assert app.compare_plot.outputs[0]["data"]["text/plain"].startswith("step 1: ")


def test_greedy_steps_draw_greedy_panels(llm):
    app = StepperApp(llm, "It is a truth", max_new_tokens=10, seed=0, do_sample=False)
    app.next_button.click()
    ev = app.decoder.trace.of("sample")[-1]
    fig = app.stage_figure(ev)
    assert len(fig.axes) == 3 and "greedy" in app.plot.outputs[0]["data"]["text/plain"]


def test_labels_are_not_cut(llm):
    """Dropdown descriptions are shown in full ("take instead" used to read "take inste…")."""
    app = StepperApp(llm, "It is a truth", max_new_tokens=10, seed=0)
    for w in (app.at_step, app.candidates, app.compare_step):
        assert w.style.description_width == "initial"


def test_a_system_prompt_goes_into_the_chat_template(llm):
    """StepperApp(chat=True, system=...) starts from the ids of the tokenizer's chat encoding of the
    system prompt and the question, as Llama.decoder does; system= alone is refused as there."""
    system, question = "Answer in one word.", "It is"
    expected = llm.tokenizer.chat([{"role": "system", "content": system}, {"role": "user", "content": question}]).ids
    app = StepperApp(llm, question, chat=True, system=system, max_new_tokens=2, seed=0)
    assert app.decoder.prompt_ids == expected and app.last_error is None
    without = StepperApp(llm, question, chat=True, max_new_tokens=2, seed=0)
    assert without.decoder.prompt_ids != expected  # the system prompt is in the ids
    app.next_button.click()
    app.reset_button.click()  # a restart keeps the system prompt
    assert app.decoder.prompt_ids == expected
    with pytest.raises(GenerationError, match="chat=True"):
        StepperApp(llm, question, system=system, max_new_tokens=2)
