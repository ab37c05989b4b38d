"""tracer/viz/quant.py: a block taken apart, rounding errors side by side, and top-k next tokens
of several models, drawn from small inputs; token labels come from the one renderer."""

from __future__ import annotations

import matplotlib.colors as mcolors
import pytest
import torch

from tracer import requant
from tracer.viz import quant as qviz
from tracer.viz import tokens
from tracer.viz.plots.common import CHOSEN

WEIGHTS = torch.randn(32, generator=torch.Generator().manual_seed(0)) * 0.05 + 0.02


def _parts(kind: str, weights: torch.Tensor = WEIGHTS) -> requant.BlockParts:
    return requant.take_apart(requant.quantize(weights.reshape(1, -1), kind), kind)


@pytest.mark.parametrize("kind", requant.QUANTIZABLE)
def test_block_figure_draws_codes_values_and_error(kind):
    parts = _parts(kind)
    fig = qviz.block_figure(parts, WEIGHTS)
    fig.canvas.draw()
    codes_ax, values_ax, error_ax = fig.axes[:3]
    assert [round(p.get_height()) for p in codes_ax.patches] == parts.codes[0].tolist()
    assert f"{float(parts.scales[0]):.4g}" in fig._suptitle.get_text()
    if parts.levels.shape[1] <= qviz.MAX_LEVELS_DRAWN:  # the 4-bit grid: one line per level, codes on the right
        twin = fig.axes[3]
        assert [t.get_text() for t in twin.get_yticklabels()] == [str(q) for q in range(16)]
    err = (parts.values[0] - WEIGHTS).abs().max()
    assert f"{float(err):.3g}" in error_ax.get_title()


def test_block_figure_without_float_weights_and_one_block_only():
    fig = qviz.block_figure(_parts("Q4_1"))
    assert [ax.get_ylabel() for ax in fig.axes[:2]] == ["code q\n(0..15)", "value"]
    assert not any(ax.get_ylabel() == "value − float" for ax in fig.axes)  # no float weights: no error panel
    assert "m = " in fig._suptitle.get_text()
    two = requant.take_apart(requant.quantize(torch.randn(1, 64), "Q4_1"), "Q4_1")
    with pytest.raises(ValueError, match="one block to draw, not 2"):
        qviz.block_figure(two)


def test_formula_names_the_formats_arithmetic():
    assert qviz.formula(_parts("Q4_0")).startswith("w = d·(q − 8)")
    assert qviz.formula(_parts("Q8_0")).startswith("w = d·q,")
    assert qviz.formula(_parts("Q4_1")).startswith("w = d·q + m")


def test_rounding_errors_one_panel_per_format():
    rounded = {k: _parts(k) for k in requant.QUANTIZABLE}
    fig = qviz.rounding_errors(WEIGHTS, rounded)
    assert len(fig.axes) == len(rounded)
    for ax, (kind, parts) in zip(fig.axes, rounded.items(), strict=True):
        assert ax.get_title().startswith(kind)
        heights = torch.tensor([p.get_height() for p in ax.patches], dtype=torch.float32)
        assert torch.allclose(heights, parts.values[0] - WEIGHTS)


# A byte-level vocabulary: a leading space is Ġ, a newline Ċ (shown ⏎ by the renderer).
PIECES = ["ĠParis", "Ċ", ".", ",", "ĠLyon", "$x", "Ġthe"]


def piece(i: int) -> str:
    return PIECES[i]


def _logits(*order) -> torch.Tensor:
    """Logits whose probabilities fall in ``order`` (ids, most likely first)."""
    out = torch.full((len(PIECES),), -10.0)
    for rank, i in enumerate(order):
        out[i] = 5.0 - rank
    return out


MODELS = {"F16": _logits(0, 1, 2, 3, 4), "Q4_0": _logits(1, 0, 5, 2, 3)}


def test_top_k_rows_quote_tokens_with_the_renderer():
    rows = qviz.top_k_rows(MODELS, piece, 3, byte_level=True)
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert rows[0]["F16"].startswith(tokens.quoted("ĠParis", byte_level=True))
    assert rows[0]["Q4_0"].startswith("‹⏎›")  # the newline, visible
    assert rows[2]["Q4_0"].startswith(tokens.quoted("$x", byte_level=True))
    p = torch.softmax(MODELS["F16"], -1)[0]
    assert rows[0]["F16"].endswith(f"{float(p):.1%}")


def test_top_k_figure_labels_and_colours():
    fig = qviz.top_k_figure(MODELS, piece, 4, byte_level=True)
    fig.canvas.draw()
    ref_ax, q_ax = fig.axes
    assert [t.get_text() for t in ref_ax.get_yticklabels()] == [
        tokens.quoted(tokens.plot_label(p, byte_level=True)) for p in ("ĠParis", "Ċ", ".", ",")]
    assert [t.get_text() for t in q_ax.get_yticklabels()][0] == "‹⏎›"
    assert r"\$x" in [t.get_text() for t in q_ax.get_yticklabels()][2]  # no mathtext
    red = mcolors.to_rgba(CHOSEN)
    # the reference's first choice (ĠParis) is red wherever it ranks: first, then second
    assert ref_ax.patches[0].get_facecolor() == red and q_ax.patches[1].get_facecolor() == red
    assert q_ax.patches[2].get_facecolor() == mcolors.to_rgba(qviz.LEVEL)  # $x: outside the reference's top 4
    assert "⏎ a newline" in fig._supxlabel.get_text()
