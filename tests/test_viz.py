"""tracer.viz plots and tables: figures built from real recorded events of a test-built checkpoint."""

from __future__ import annotations

import dataclasses

import builders
import pytest
import torch
from matplotlib.figure import Figure

import tracer
from tracer.config import LlamaConfig
from tracer.viz import TraceExplorer, patterns_of, plots, tables, tokens
from tracer.viz.attention import AttentionExplorer

LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def viz_checkpoint(tmp_path_factory):
    """A small sharded GQA checkpoint (8 query heads, 2 KV heads), built once per session."""
    folder = tmp_path_factory.getbasetemp() / "viz-checkpoint"
    if not (folder / "config.json").exists():
        tok = tmp_path_factory.mktemp("viz-tokenizer")
        builders.train_sentencepiece(tok)
        builders.build_checkpoint(folder, tok, hidden=64, layers=2, heads=8, kv_heads=2, intermediate=96,
                                  shard_size="100KB")
    llm = tracer.load(folder, progress=False)
    # Random weights draw </s> now and then; never stop early, so step counts are predictable.
    llm.defaults = dataclasses.replace(llm.defaults, eos_token_ids=())
    return llm


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return viz_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def recorded(llm):
    dec = llm.decoder("It is a truth universally", max_new_tokens=4, capture="full",
                      points=["blocks.*.attn.pattern", "blocks.0.resid_post"], lens=True, do_sample=True,
                      seed=0, top_k=20, top_p=0.9, repetition_penalty=1.3)
    dec.run()
    return dec


def titles(fig: Figure) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def test_weights_memory_llama2_7b_numbers():
    assert LLAMA2_7B.num_parameters == 6_738_415_616
    assert round(LLAMA2_7B.memory_bytes("float16") / 1e9, 1) == 13.5
    fig = plots.weights_memory(LLAMA2_7B, name="Llama-2-7B", kv_tokens=4096)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["float32", "float16", "bfloat16"]
    assert "6.74 billion parameters" in ax.get_title(loc="left") and ax.get_xlabel().startswith("GB")
    rows = tables.fits_table(LLAMA2_7B, gpus={"small": 12, "big": 80})  # rows[0]: what is needed
    assert rows[1]["float16"].startswith("no") and rows[2]["float32"].startswith("yes")
    parts = tables.params_table(LLAMA2_7B)
    assert parts[-1]["parameters"] == "6,738,415,616"


def test_load_timeline_has_one_bar_per_shard(llm):
    shards = llm.load_trace.of("load_shard")
    assert len(shards) > 1  # sharded checkpoint
    fig = plots.load_timeline(llm.load_trace)
    ax_t, ax_b = fig.axes[:2]
    assert [t.get_text() for t in ax_t.get_yticklabels()] == [e.file for e in shards]
    assert ax_t.get_title() == "per-shard load timeline" and "milliseconds" in ax_t.get_xlabel()
    assert ax_b.get_xlabel() == "MB"
    assert any("float32 on cpu" in t.get_text() for t in ax_t.texts)
    assert len(plots.to_png(fig)) > 1000


def test_prefill_plots_residual_norms_attention_and_lens(llm, recorded):
    pre = recorded.trace.of("prefill")[0]
    pieces = recorded.trace.of("tokenize")[0].pieces
    fig = plots.residual_norms(pre)
    assert len(fig.axes[0].lines[0].get_xdata()) == llm.config.num_hidden_layers
    pats = patterns_of(pre)
    assert list(pats) == [0, 1] and pats[0].shape == (8, len(pieces), len(pieces))
    fig = plots.attention_heatmap(pats[1][3], pieces, pieces, title="layer 1 head 3")
    ax = fig.axes[0]
    # The renderer's labels, between its marks (a lone "," stays visible), and its legend below.
    marked = [tokens.quoted(x) for x in plots.labels(pieces)]
    assert [t.get_text() for t in ax.get_xticklabels()] == marked
    assert [t.get_text() for t in ax.get_yticklabels()] == marked
    assert tokens.LEGEND["▁"] in fig.get_supxlabel()
    assert ax.get_title() == "layer 1 head 3" and "key" in ax.get_xlabel() and "query" in ax.get_ylabel()
    fig = plots.attention_heads(pats[0], pieces, llm.config, layer=0)
    assert sum(1 for a in fig.axes if a.get_title()) == 8 and "q head 5 (kv 1)" in titles(fig)
    assert "GQA" in plots.gqa_groups(llm.config).axes[0].get_title()
    fig = plots.logit_lens(pre, llm.tokenizer.id_to_piece)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["layer 0", "layer 1"]
    best = pre.logit_lens[0]
    cell = fig.axes[0].texts[0].get_text()  # layer 0's top guess
    assert cell == f"{tokens.quoted(plots.label(llm.tokenizer.id_to_piece(best['ids'][0]), 10))} {best['probs'][0]:.2f}"
    rows = tables.logit_lens_rows(pre, llm.tokenizer.id_to_piece)
    assert [r["layer"] for r in rows] == [0, 1] and "#1" in rows[0]
    assert rows[0]["#1"] == f"{tokens.quoted(llm.tokenizer.id_to_piece(best['ids'][0]))} {best['probs'][0]:.3f}"
    kv = tables.kv_cache_rows(recorded.trace.events)
    assert [r["event"] for r in kv] == ["prefill"] + ["decode_step"] * 3
    assert kv[0]["K (and V) per layer [B, Hkv, S, hd]"] == str([1, 2, len(pieces), 8])


def test_attention_explorer_switches_layer_and_head(llm, recorded):
    pre = recorded.trace.of("prefill")[0]
    app = AttentionExplorer.from_event(pre, recorded.trace.of("tokenize")[0].pieces, llm.config)
    first = app.plot.outputs
    assert first and "image/png" in first[0]["data"]
    app.head.value = 5
    assert "key/value head 1" in app.info.value and app.plot.outputs != first
    app.layer.value = 0
    app.view.value = "all heads"
    assert app.head.disabled


def test_sampling_stage_plots_highlight_the_chosen_token(llm, recorded):
    ev = recorded.trace.of("sample")[1]
    fig = plots.sampling_stages(ev, llm.tokenizer.id_to_piece, top=8)
    stage_axes = [a for a in fig.axes if a.get_title()]
    assert [a.get_title() for a in stage_axes] == [plots.STAGE_TITLES[s] for s in tracer.sampling.STAGES]
    final = stage_axes[-1]
    red = [p for p in final.patches if tuple(p.get_facecolor()[:3]) == (214 / 255, 39 / 255, 40 / 255)]
    assert len(red) == 1  # the chosen token, added below the top 8 if it was not among them
    assert f"step {ev.step}" in fig._suptitle.get_text()
    b = recorded.branch(1, ev.stages["final"]["ids"][0] if ev.chosen_id != ev.stages["final"]["ids"][0]
                        else ev.stages["final"]["ids"][1])
    fig = plots.compare_steps(ev, b.trace.of("sample")[1], llm.tokenizer.id_to_piece)
    assert [a.get_title().split(":")[0] for a in fig.axes] == ["branch A", "branch B"]


def test_tensor_plots_and_trace_explorer(llm, recorded, tmp_path):
    path = recorded.trace.save(tmp_path / "trace")
    trace = tracer.Trace.load(path)
    t = trace.of("prefill")[0].tensors["blocks.0.resid_post"]
    s = plots.tensor_stats(t)
    assert s["shape"] == list(t.shape) and s["dtype"] == "float32" and s["non_finite"] == 0
    assert s["min"] <= s["mean"] <= s["max"]
    assert "histogram" in plots.tensor_histogram(t, title="r").axes[0].get_title()
    with pytest.raises(ValueError, match="2-D"):
        plots.tensor_heatmap(t)
    assert plots.tensor_heatmap(t[0]).axes[0].get_xlabel().startswith("last dim")
    assert plots.tensor_stats(torch.tensor([1.0, float("inf")]))["non_finite"] == 1

    app = TraceExplorer(trace)
    assert app.event.stage == "prefill" and app.tensor.value  # opens on the first event with tensors
    assert "blocks.0.attn.pattern" in app.tensor.options
    app.tensor.value = "blocks.0.attn.pattern"  # [1, H, T, S]: two index sliders, a [T, S] slice
    assert len(app.indices.children) == 2
    before = app.heat.outputs
    app.indices.children[1].value = 3
    assert app.heat.outputs != before and "shape" in app.stats.value
    app.events.value = trace.of("sample")[0].seq
    assert app.tensor.disabled and "chosen_id" in app.details.value and app.heat.outputs == ()
    assert "load_shard" in tracer.viz.summary_html(trace)


def test_labels_make_pieces_printable():
    assert plots.label("▁the") == "▁the"
    assert plots.label("🦙") == "U+1F999"
    assert plots.label("a\nb") == "a⏎b"  # the one token renderer (tracer.viz.tokens): a visible sign
    assert plots.label("<0x0A>") == "⏎" and plots.label("Ċ", byte_level=True) == "⏎"
    assert plots.label("$x$") == r"\$x\$"
    assert plots.label("x" * 30, 10).endswith("…")
