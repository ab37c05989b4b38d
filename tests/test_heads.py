"""tracer.viz.heads: head scores on synthetic patterns whose right answer is known, the hooks that
zero heads and read the logit lens, and on the real model: an induction head found by its score,
whose removal hurts copying more than removing control heads does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import tracer
from tracer.viz import heads, plots, tables

T, PERIOD, PREFIX = 21, 10, 1  # BOS + two copies of 10 tokens


def one_hot_pattern(key_of) -> torch.Tensor:
    """[T, T]: query q puts all its weight on key key_of(q) (which must be <= q)."""
    p = torch.zeros(T, T)
    for q in range(T):
        p[q, key_of(q)] = 1.0
    return p


FIRST = one_hot_pattern(lambda q: 0)
PREVIOUS = one_hot_pattern(lambda q: max(q - 1, 0))
INDUCTION = one_hot_pattern(lambda q: q - PERIOD + 1 if q >= PREFIX + PERIOD else 0)
SELF = one_hot_pattern(lambda q: q)  # looks at itself: none of the three kinds


def test_each_score_picks_its_own_kind_of_head():
    patterns = torch.stack([FIRST, PREVIOUS, INDUCTION, SELF])[None]  # [L=1, H=4, T, T]
    first = heads.first_token_score(patterns)
    prev = heads.previous_token_score(patterns)
    ind = heads.induction_score(patterns, PERIOD, prefix=PREFIX)
    assert first.shape == prev.shape == ind.shape == (1, 4)
    assert first[0, 0] == 1 and prev[0, 1] == 1 and ind[0, 2] == 1
    assert [int(s[0].argmax()) for s in (first, prev, ind)] == [0, 1, 2]
    # Query 1's previous token is the first token: the only overlap between the two kinds.
    assert first[0, 1] == pytest.approx(1 / (T - 1)) and prev[0, 0] == pytest.approx(1 / (T - 1))
    assert ind[0, 0] == 0 and ind[0, 1] == 0 and ind[0, 3] == 0 and prev[0, 3] == 0 and first[0, 3] == 0
    # The induction pattern attends to the first token outside the second copy.
    assert first[0, 2] == pytest.approx((PREFIX + PERIOD - 1) / (T - 1))


def test_induction_score_uses_the_offset_of_the_prefix():
    # The key is always q - period + 1; the prefix says which queries are the second copy. Without
    # the BOS, query 10 (the first copy's last token) is counted and query 20 is not: 9 of 10 hit.
    assert heads.induction_score(INDUCTION, PERIOD, prefix=PREFIX) == 1
    assert heads.induction_score(INDUCTION, PERIOD, prefix=0) == pytest.approx(0.9)


def test_uniform_head_scores_its_closed_form():
    u = heads.uniform_pattern(T)
    assert torch.allclose(u.sum(-1), torch.ones(T)) and u.triu(1).abs().sum() == 0
    expected_first = sum(1 / (q + 1) for q in range(1, T)) / (T - 1)
    expected_ind = sum(1 / (q + 1) for q in range(PREFIX + PERIOD, T)) / PERIOD
    assert float(heads.first_token_score(u)) == pytest.approx(expected_first)
    assert float(heads.previous_token_score(u)) == pytest.approx(expected_first)
    assert float(heads.induction_score(u, PERIOD, prefix=PREFIX)) == pytest.approx(expected_ind)


def test_scores_refuse_patterns_they_cannot_read():
    with pytest.raises(ValueError, match="without a cache"):
        heads.first_token_score(torch.ones(2, 3, 5))  # [.., T=3, S=5]: a decode step's pattern
    with pytest.raises(ValueError, match="no second copy"):
        heads.induction_score(FIRST, period=T)


def test_top_heads_and_control_heads():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.05, 0.8]])
    top = heads.top_heads(scores, 2)
    assert [(h.layer, h.head, h.name) for h in top] == [(0, 1, "0.1"), (1, 2, "1.2")]
    assert top[0].score == pytest.approx(0.9)
    below = {(0, 0), (0, 2), (1, 1)}  # below the mean (0.392)
    drawn = heads.control_heads(scores, 2, seed=0, exclude=[(0, 2)])
    assert len(drawn) == 2 and {(h.layer, h.head) for h in drawn} <= below - {(0, 2)}
    assert heads.control_heads(scores, 2, seed=0, exclude=[(0, 2)]) == drawn  # seeded
    assert {(h.layer, h.head) for h in heads.control_heads(scores, 5, seed=1)} == below


def test_repeated_random_tokens_avoid_specials_and_follow_bos_rule():
    tok = SimpleNamespace(vocab_size=40, special_tokens={"<s>": 1, "<pad>": 3}, bos_id=1, eos_id=2,
                          add_bos_token=False)
    rep = heads.repeated_random_tokens(tok, 12, seed=7)
    assert rep.prefix == 0 and len(rep.ids) == 24 and rep.ids[:12] == rep.ids[12:]
    assert len(set(rep.ids[:12])) == 12 and not set(rep.ids) & {1, 2, 3}
    assert rep.second_copy == range(12, 24) and rep.predictable == range(13, 24)
    assert heads.repeated_random_tokens(tok, 12, seed=7) == rep
    assert heads.repeated_random_tokens(tok, 12, seed=8).ids != rep.ids
    with_bos = heads.repeated_random_tokens(SimpleNamespace(**{**vars(tok), "add_bos_token": True}), 12, seed=7)
    assert with_bos.ids == [1] + rep.ids and with_bos.prefix == 1 and with_bos.second_copy == range(13, 25)


def test_score_figures_and_rows():
    scores = {"first token": torch.rand(4, 6), "induction": torch.rand(4, 6)}
    fig = plots.head_scores(scores, group=3, baselines={"induction": 0.01})
    ax = fig.axes[0]
    assert ax.get_ylabel() == "layer" and ax.get_xlabel().startswith("query head")
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(h) for h in range(6)]
    assert "0.01 if uniform" in fig.axes[1].get_title() and len(ax.texts) == 3  # top 3 annotated
    assert len([line for line in ax.lines if line.get_xdata()[0] == 2.5]) == 1  # KV group separator
    rows = tables.head_rows(scores, k=2, group=3, baselines={"induction": 0.01})
    best = heads.top_heads(scores["induction"], 1)[0]
    assert [r["kind"] for r in rows] == ["first token"] * 2 + ["induction"] * 2
    assert rows[2]["head (layer.head)"] == best.name and rows[2]["KV head"] == best.head // 3
    assert rows[2]["uniform head"] == 0.01 and rows[0]["uniform head"] == ""
    fig = plots.ablation_losses({"none": 2.0, "a": 4.0, "c": 2.1}, controls=["c"])
    bars = fig.axes[0].patches
    assert [round(b.get_width(), 3) for b in bars] == [2.0, 4.0, 2.1]
    assert bars[1].get_facecolor() != bars[2].get_facecolor()
    fig = plots.head_patterns([("first", FIRST), ("induction", INDUCTION)], boundary=PREFIX + PERIOD)
    assert [ax.get_title() for ax in fig.axes[:2]] == ["first", "induction"]
    assert f"position {PREFIX + PERIOD}" in fig.get_supxlabel()
    curves = {"none": torch.rand(T), "zeroed": torch.rand(T), "control": torch.rand(T)}
    fig = plots.loss_by_position(curves, boundary=PREFIX + PERIOD, controls=["control"], vocab_size=100)
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    assert lines["control"].get_color() == plots.forward.CONTROL and lines["none"].get_color() == plots.OTHER
    assert lines["zeroed"].get_color() == plots.CHOSEN
    assert any("ln V" in t.get_text() for t in fig.legends[0].get_texts())


# --- On a model: the embedded one (small, fast) ----------------------------------------------


@pytest.fixture(scope="module")
def small():
    return tracer.load(progress=False)


def test_zero_heads_zeroes_exactly_those_heads_and_detaches(small):
    ids = small.tokenizer.encode("It is a truth universally acknowledged")
    layer = 1
    before = small.logits(ids)
    with small.model.hooks.record(f"blocks.{layer}.attn.*") as plain:
        small.logits(ids)
    with heads.zero_heads(small, [(layer, 2), heads.Head(layer, 5, 0.0)]):
        with small.model.hooks.record(f"blocks.{layer}.attn.*") as rec:
            ablated = small.logits(ids)
    z, z0 = rec[f"blocks.{layer}.attn.z"], plain[f"blocks.{layer}.attn.z"]
    assert z[:, :, [2, 5]].abs().sum() == 0 and z0[:, :, [2, 5]].abs().sum() > 0
    others = [h for h in range(small.config.num_attention_heads) if h not in (2, 5)]
    assert torch.equal(z[:, :, others], z0[:, :, others])
    assert not torch.allclose(rec[f"blocks.{layer}.attn.out"], plain[f"blocks.{layer}.attn.out"])
    assert not small.model.hooks.any_active  # nothing left attached: the model is itself again
    assert torch.equal(small.logits(ids), before) and not torch.allclose(ablated, before)
    all_heads = [(layer, h) for h in range(small.config.num_attention_heads)]
    with heads.zero_heads(small, all_heads), small.model.hooks.record(f"blocks.{layer}.attn.out") as rec:
        small.logits(ids)
    assert rec[f"blocks.{layer}.attn.out"].abs().max() == 0  # no bias: the layer's attention adds nothing


def test_token_losses_are_the_cross_entropy_of_the_logits(small):
    ids = small.tokenizer.encode("Once upon a time there was a small dog")
    losses = heads.token_losses(small, ids)
    expected = torch.nn.functional.cross_entropy(small.logits(ids)[:-1], torch.tensor(ids[1:]), reduction="none")
    assert torch.isnan(losses[0]) and torch.allclose(losses[1:], expected, atol=1e-5)
    assert heads.loss_on(small, ids, [2, 3]) == pytest.approx(float(expected[[1, 2]].mean()), abs=1e-5)


def test_logit_lens_probs_end_at_the_model_and_match_the_decoders_lens(small):
    prompt = "It is a truth universally"
    ids = small.tokenizer.encode(prompt)
    probs = heads.logit_lens_probs(small, ids)
    assert probs.shape == (small.config.num_hidden_layers, small.config.vocab_size)
    assert torch.allclose(probs[-1], small.logits(ids)[-1].softmax(-1), atol=1e-5)
    dec = small.decoder(prompt, max_new_tokens=1, lens=True, top_n=3)
    dec.step()
    event = dec.trace.of("prefill")[0]
    assert [r["ids"] for r in event.logit_lens] == probs.topk(3).indices.tolist()
    top = int(probs[-1].argmax())
    first = heads.first_top_layer(probs, top)
    assert first is not None and int(probs[first].argmax()) == top
    assert all(int(probs[i].argmax()) != top for i in range(first))
    assert heads.first_top_layer(torch.tensor([[0.9, 0.1], [0.8, 0.2]]), 1) is None
    fig = plots.lens_probability(probs, top, small.tokenizer.id_to_piece)
    assert f"layer {first}" in fig.get_suptitle() and len(fig.axes[0].lines[0].get_xdata()) == len(probs)


# --- On the real model: what a trained model shows -------------------------------------------


@pytest.fixture(scope="module")
def real():
    return tracer.load("smollm2", device="cpu", dtype="float32", progress=False)


@pytest.mark.slow
def test_real_model_has_an_induction_head_that_copying_needs(real):
    rep = heads.repeated_random_tokens(real.tokenizer, 50, seed=0)
    scores = heads.induction_score(heads.attention_patterns(real, rep.ids), rep.period, prefix=rep.prefix)
    assert scores.shape == (30, 9)
    best = heads.top_heads(scores, 1)[0]
    assert best.score > 0.5 and best.score > 10 * float(scores.mean())
    base = heads.loss_on(real, rep.ids, rep.predictable)
    rise = heads.loss_on(real, rep.ids, rep.predictable, ablate=[best]) - base
    controls = heads.control_heads(scores, 3, seed=0)
    control_rises = [heads.loss_on(real, rep.ids, rep.predictable, ablate=[c]) - base for c in controls]
    assert rise > 0.5, f"zeroing {best.name} raised the loss by only {rise:.2f}"
    assert rise > 2 * max(control_rises), (best.name, rise, [(c.name, r) for c, r in zip(controls, control_rises)])
