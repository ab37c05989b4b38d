"""What the stepper's panels say, checked against tracer.sampling on the whole vocabulary.

A run records its logits (capture="full", points=["logits"]); each step's stages are recomputed from
them with tracer.sampling, and the ``sample`` event's numbers, the panels' notes, the cut rows and the
greedy figure must agree with that recomputation.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_viz import viz_checkpoint
from torch.overrides import TorchFunctionMode

import tracer
from tracer import sampling
from tracer.trace import SampleEvent
from tracer.viz import plots
from tracer.viz.plots.sampling import CUT_GID, CUT_MARKS, GREEDY_FINAL_TITLE, ROW_LABEL, rows_of

SAMPLE = dict(do_sample=True, temperature=0.7, top_k=6, top_p=0.6, repetition_penalty=1.3)
GREEDY = dict(do_sample=False, repetition_penalty=1.3)
TOP = 10  # rows the figures show
RED = tuple(int(plots.CHOSEN[i:i + 2], 16) / 255 for i in (1, 3, 5))


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return viz_checkpoint(tmp_path_factory)


def recomputed(llm, **settings):
    """Each step's event with its stages recomputed on the whole vocabulary, and the ids before it."""
    dec = llm.decoder("It is a truth universally", max_new_tokens=5, seed=0, capture="full", points=["logits"],
                      **settings)
    dec.run()
    forwards = [e for e in dec.trace.events if e.stage in ("prefill", "decode_step")]
    out = []
    for fwd, ev in zip(forwards, dec.trace.of("sample"), strict=True):
        previous = torch.tensor([dec.ids[: len(dec.prompt_ids) + ev.step]])
        logits = fwd.tensors["logits"][0, -1].float()
        out.append((ev, sampling.stage_scores(logits[None], previous, dec.settings), previous))
    return out


@pytest.fixture(scope="module")
def sampled(llm):
    return recomputed(llm, **SAMPLE)


def note(ax) -> str:
    """A panel's note (the annotation above it), on one line."""
    (text,) = [t.get_text() for t in ax.texts if hasattr(t, "xyann")]
    return " ".join(text.split())


def panels(fig) -> dict[str, object]:
    return {ax.get_title(): ax for ax in fig.axes}


@pytest.mark.parametrize("settings", [SAMPLE, GREEDY], ids=["sample", "greedy"])
def test_recorded_stage_numbers_equal_tracer_sampling(llm, settings):
    for ev, stages, previous in recomputed(llm, **settings):
        effects = sampling.stage_effects(stages)
        assert ev.kept == {s: n for s, (n, _) in effects.items()}
        assert ev.mass_kept == pytest.approx({s: m for s, (_, m) in effects.items()}, abs=1e-5)
        k = 20  # the decoder's default top_n
        best = torch.topk(stages["repetition_penalty"][0], k).indices.tolist()
        assert ev.candidate_ids[:k] == best
        assert ev.candidate_ids[k:] in ([], [ev.chosen_id]) and ev.chosen_id in ev.candidate_ids
        ids = torch.tensor(ev.candidate_ids)
        for s in sampling.STAGES:
            scores = stages[s][0]
            probs = scores if s == "final" else torch.softmax(scores, -1)
            torch.testing.assert_close(torch.tensor(ev.at_candidates[s]["probs"]), probs[ids], atol=1e-6, rtol=0)
            if s != "final":
                assert torch.equal(torch.tensor(ev.at_candidates[s]["scores"]), scores[ids])
        seen = set(previous[0].tolist())
        assert ev.penalized == len(seen) and ev.penalized_ids == [i for i in ev.candidate_ids if i in seen]
    if settings["do_sample"]:
        assert any(ev.kept["top_k"] < ev.kept["raw"] and ev.kept["top_p"] < ev.kept["top_k"]
                   for ev, _, _ in recomputed(llm, **settings)), "the settings should cut"


def test_each_panel_states_what_its_stage_did(llm, sampled):
    ev, stages, previous = sampled[2]
    effects = sampling.stage_effects(stages)
    fig = plots.sampling_stages(ev, llm.tokenizer.id_to_piece, top=TOP)
    ax = panels(fig)
    V = llm.config.vocab_size
    assert f"{V:,} tokens" in note(ax["raw logits"])
    assert f"the {len(set(previous[0].tolist()))} tokens already in the text" in note(ax["after repetition penalty"])
    top0, top1 = (torch.softmax(stages[s][0], -1).max().item() for s in ("repetition_penalty", "temperature"))
    assert f"top probability {top0:.3f} → {top1:.3f}" in note(ax["after temperature"])
    for stage, title in (("top_k", "after top-k"), ("top_p", "after top-p")):
        kept, mass = effects[stage]
        before = effects[sampling.STAGES[sampling.STAGES.index(stage) - 1]][0]
        assert 0.001 <= mass < 0.999  # so that the percentage below is printed as it is
        assert f"kept {kept:,} of {before:,} tokens ({100 * mass:.1f}% of the probability)" in note(ax[title])
    final = stages["final"][0]
    rank = int((final > final[ev.chosen_id]).sum())
    assert f"p = {final[ev.chosen_id].item():.3f}, rank #{rank + 1} of {effects['final'][0]:,} in play" in note(
        ax["final (drawn from)"])
    assert fig._suptitle.get_text().startswith(f"step {ev.step}: drew ")


def test_cut_tokens_stay_where_they_were_and_the_chosen_is_red_everywhere(llm, sampled):
    piece = llm.tokenizer.id_to_piece
    cut_seen = 0
    for ev, stages, _ in sampled:
        fig = plots.sampling_stages(ev, piece, top=TOP)
        rows = rows_of(ev, TOP).ids
        assert rows[:TOP] == ev.candidate_ids[:TOP]  # the same rows in every panel
        for ax, stage in zip(fig.axes, sampling.STAGES, strict=True):
            scores = stages[sampling.STAGES[-2] if stage == "final" else stage][0]
            cut = [r for r, i in enumerate(rows) if scores[i] == -math.inf]
            marked = [round(y) for c in ax.collections if c.get_gid() == CUT_MARKS for _, y in c.get_offsets()]
            assert marked == cut, stage
            hatched = [round(path.vertices[:, 1].mean()) for c in ax.collections if c.get_gid() == CUT_GID
                       for path in c.get_paths()]
            assert hatched == ([] if stage == "final" else cut), stage  # final has no "before" outlines
            cut_seen += len(cut)
            chosen = rows.index(ev.chosen_id)
            red = [round(p.get_y() + p.get_height() / 2) for p in ax.patches
                   if p.get_fill() and tuple(p.get_facecolor()[:3]) == pytest.approx(RED)]
            assert red == [chosen], stage
        for ax in fig.axes[::3]:  # the rows are labelled in the first panel of each row of panels
            labels = [t for t in ax.texts if t.get_gid() == ROW_LABEL]
            assert [round(t.get_position()[1]) for t in labels] == list(range(len(rows)))
            assert [t.get_fontweight() for t in labels].count("bold") == 1
            assert labels[rows.index(ev.chosen_id)].get_color() == plots.CHOSEN
    assert cut_seen > 0, "the settings should cut some of the rows on show"


def test_greedy_shows_the_processors_then_argmax(llm):
    ev, stages, _ = recomputed(llm, **GREEDY)[1]
    fig = plots.sampling_stages(ev, llm.tokenizer.id_to_piece, top=TOP)
    assert [ax.get_title() for ax in fig.axes] == ["raw logits", "after repetition penalty", GREEDY_FINAL_TITLE]
    texts = " ".join([fig._suptitle.get_text()] + [t.get_text() for ax in fig.axes for t in ax.texts])
    assert "drawn" not in texts and "drew" not in texts and "top-k" not in texts and "T " not in texts
    assert "highest score" in note(fig.axes[2]) and "greedy" in fig._suptitle.get_text()
    assert ev.chosen_id == int(torch.argmax(stages["repetition_penalty"][0])) == ev.candidate_ids[0]
    assert [ax.get_xlabel() for ax in fig.axes] == ["score (logit)", "score (logit)", "probability"]
    # A token chosen by the user in greedy mode: still the greedy chain, and said so.
    dec = llm.decoder("It is a truth universally", max_new_tokens=3, seed=0, **GREEDY)
    dec.run()
    branch = dec.branch(1, dec.trace.of("sample")[1].candidate_ids[1])
    fig = plots.sampling_stages(branch.trace.of("sample")[1], llm.tokenizer.id_to_piece, top=TOP)
    assert len(fig.axes) == 3 and "instead of the highest score" in note(fig.axes[2])
    assert fig._suptitle.get_text().startswith("step 1: you chose ")


def test_panels_share_x_scales(llm, sampled):
    fig = plots.sampling_stages(sampled[0][0], llm.tokenizer.id_to_piece, top=TOP)
    limits = [ax.get_xlim() for ax in fig.axes]
    assert limits[0] == limits[1] and len(set(limits[2:])) == 1
    assert all(ax.get_xlabel() for ax in fig.axes)
    ev = sampled[1][0]
    cmp = plots.compare_steps(ev, ev, llm.tokenizer.id_to_piece)
    assert cmp.axes[0].get_xlim() == cmp.axes[1].get_xlim()


def test_new_fields_survive_save_and_old_traces_still_draw(llm, tmp_path):
    dec = llm.decoder("It is a truth", max_new_tokens=3, seed=0, **SAMPLE)
    dec.run()
    back = tracer.Trace.load(dec.trace.save(tmp_path / "t")).of("sample")
    for a, b in zip(dec.trace.of("sample"), back, strict=True):
        assert (b.candidate_ids, b.at_candidates, b.kept, b.mass_kept, b.penalized, b.penalized_ids) == (
            a.candidate_ids, a.at_candidates, a.kept, a.mass_kept, a.penalized, a.penalized_ids)
        assert any(-math.inf in b.at_candidates[s]["scores"] for s in ("top_k", "top_p"))
    # A trace from before these fields: the figure falls back to each stage's own top list.
    old = {k: v for k, v in dec.trace.of("sample")[1].to_json().items()
           if k not in ("candidate_ids", "at_candidates", "kept", "mass_kept", "penalized", "penalized_ids",
                        "stage", "tensor_names")}
    fig = plots.sampling_stages(SampleEvent(**old), llm.tokenizer.id_to_piece, top=TOP)
    assert [ax.get_title() for ax in fig.axes] == [plots.STAGE_TITLES[s] for s in sampling.STAGES]


class _HostReads(TorchFunctionMode):
    """Counts the tensor methods that wait for the device and copy to the host."""

    READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("settings", [SAMPLE, GREEDY], ids=["sample", "greedy"])
def test_light_capture_still_copies_to_the_host_once_per_step(llm, settings):
    """The common candidates, the counts, the shares and the finiteness check all ride on the
    step's one ``tolist``, greedy or sampled."""
    dec = llm.decoder("It is a truth", max_new_tokens=6, seed=0, **settings)
    dec.step()
    for _ in range(3):
        with _HostReads() as reads:
            dec.step()
        assert reads.calls == ["tolist"]
