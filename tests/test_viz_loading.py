"""Notebook 01's memory, fits and load views, and notebook 06's trace explorer: what a learner reads.

Figures are checked the way a reader sees them: bars that fill their axis, labels whose drawn
extents lie inside their axes (after an Agg draw), a vector drawn as a line or bars and a matrix
as a heatmap; tables and explorer fields as text with token pieces beside ids.
"""

from __future__ import annotations

import base64
import re
import zlib

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

import tracer
from tracer.config import LlamaConfig
from tracer.trace import LoadShardEvent, SampleEvent, TokenizeEvent, Trace
from tracer.viz import TraceExplorer, plots, summary_html, tables
from tracer.viz.explorers import Pieces, relative_times, treescope_html
from tracer.walkthrough import IN_TRANSFORMERS

LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
SMALL = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)


def drawn(fig):
    """Draw with an Agg canvas (as a PNG would be), so that extents are the real ones."""
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def assert_texts_inside(fig, ax, texts):
    renderer = drawn(fig)
    box = ax.get_window_extent(renderer)
    assert texts
    for t in texts:
        ext = t.get_window_extent(renderer)
        assert box.x0 - 1 <= ext.x0 and ext.x1 <= box.x1 + 1, (t.get_text(), ext, box)


# ------------------------------------------------------------------------ notebook 01: memory


def test_fits_table_applies_its_headroom_rule():
    need = (LLAMA2_7B.memory_bytes("float16") + LLAMA2_7B.kv_cache_bytes(4096, "float16")) / 1e9
    gpus = {"within": need + tables.HEADROOM_GB + 0.01, "just outside": need + tables.HEADROOM_GB - 0.01,
            "T4 (16 GB)": 16}
    rows = tables.fits_table(LLAMA2_7B, gpus=gpus, kv_tokens=4096)
    assert rows[0]["GPU"].startswith("needs") and rows[0]["float16"] == "13.48 GB + 2.15 GB + 2.00 GB = 17.63 GB"
    by_gpu = {r["GPU"]: r for r in rows[1:]}
    assert by_gpu["within"]["float16"].startswith("yes")
    assert by_gpu["just outside"]["float16"].startswith("no")  # weights and cache fit, the headroom does not
    assert by_gpu["T4 (16 GB)"]["float16"] == "no, 1.63 GB short"  # 15.6 GB of weights + cache: not "yes"
    assert tables.fits_table(LLAMA2_7B, gpus={"T4": 16}, headroom_gb=0)[1]["float16"].startswith("yes")


def test_weights_memory_gives_each_model_a_scale_that_shows_it():
    fig = plots.weights_memory({"this model": SMALL, "Llama-2-7B": LLAMA2_7B})
    rows = [a for a in fig.axes if a.patches]
    assert len(rows) == 2  # the small model and the 7B, one figure
    for ax in rows:
        right = max(p.get_x() + p.get_width() for p in ax.patches)
        assert right / ax.get_xlim()[1] > 0.4, ax.get_title()  # the bars fill their axis
    small, big = rows
    assert small.get_xlabel().startswith("MB") and big.get_xlabel().startswith("GB")
    small_title, big_title = small.get_title(loc="left"), big.get_title(loc="left")
    assert "6.33 million parameters" in small_title and "e9" not in small_title
    assert "6.74 billion parameters" in big_title and "1,065x this model" in big_title
    assert not small.lines and big.lines  # GPU sizes drawn only where they are on the same scale
    for ax in rows:
        assert_texts_inside(fig, ax, ax.texts)


# ------------------------------------------------------------------------ notebook 01: loading


def shard(file: str, start: float, by_type: dict[str, tuple[int, int, int, float]], **kw) -> LoadShardEvent:
    """A load_shard event; by_type: stored type -> (tensors, bytes on disk, bytes in memory, seconds)."""
    rows = {t: dict(zip(("tensors", "bytes_on_disk", "bytes_in_memory", "seconds"), v)) for t, v in by_type.items()}
    return LoadShardEvent(time=start, seconds=sum(r["seconds"] for r in rows.values()), file=file, device="cpu",
                          dtype="float32", num_tensors=sum(r["tensors"] for r in rows.values()),
                          bytes_on_disk=sum(r["bytes_on_disk"] for r in rows.values()),
                          bytes_in_memory=sum(r["bytes_in_memory"] for r in rows.values()), by_type=rows, **kw)


def gguf_trace() -> Trace:
    n4, n8 = 32 * 3000, 32 * 1000  # weights in Q4_1 and Q8_0 blocks
    return Trace([shard("model.Q4_1.gguf", 100.0, {"Q8_0": (1, 34 * n8 // 32, 4 * n8, 0.5),
                                                    "float32": (3, 4 * 96, 4 * 96, 0.01),
                                                    "Q4_1": (7, 20 * n4 // 32, 4 * n4, 20.0)},
                       casts={"Q8_0->float32": 1, "Q4_1->float32": 7}, tensors_mapped=3, format="gguf")])


def sharded_trace() -> Trace:
    return Trace([shard(f"model-0000{i}-of-00002.safetensors", 50.0 + 0.3 * i, {"float16": (30, 2 << 20, 4 << 20, 0.3)},
                        casts={"float16->float32": 30}) for i in (1, 2)])


@pytest.mark.parametrize("make", [sharded_trace, gguf_trace], ids=["shards", "gguf"])
def test_load_timeline_labels_stay_inside_their_plot(make):
    fig = plots.load_timeline(make())
    ax_t = fig.axes[0]
    assert any("float32 on cpu" in t.get_text() for t in ax_t.texts)
    assert_texts_inside(fig, ax_t, ax_t.texts)
    right = max(p.get_x() + p.get_width() for p in ax_t.patches)
    assert right / ax_t.get_xlim()[1] > 0.3  # room for the labels, not at the bars' expense


def test_load_timeline_splits_a_gguf_bar_by_stored_type():
    fig = plots.load_timeline(gguf_trace())
    ax_t = fig.axes[0]
    assert len(ax_t.patches) == 3 and "seconds" in ax_t.get_xlabel()  # 20 s: seconds, not 20000 ms
    legend = [t.get_text() for t in ax_t.get_legend().get_texts()]
    assert legend == ["Q8_0: 1 tensors", "float32: 3 tensors", "Q4_1: 7 tensors"]


def test_casts_and_stored_types_are_text():
    row = tables.shard_rows(sharded_trace().events)[0]
    assert row["casts"] == "float16 → float32 (30 tensors)" and row["runtime"] == "float32 on cpu"
    assert plots.casts_text({}) == "no casts"
    rows = {r["stored type"]: r for r in tables.by_type_rows(gguf_trace().events[0])}
    assert rows["Q4_1"]["block"] == "32 weights in 20 bytes" and rows["Q4_1"]["bits per weight on disk"] == 5.0
    assert rows["Q8_0"]["block"] == "32 weights in 34 bytes" and rows["Q8_0"]["bits per weight on disk"] == 8.5
    assert rows["float32"]["bits per weight on disk"] == 32.0 and rows["Q4_1"]["memory / disk"] == "6.40x"
    assert rows["Q4_1"]["in memory as"] == "float32"
    for r in rows.values():
        assert not any(isinstance(v, (dict, list)) or "{" in str(v) for v in r.values())


def test_a_kept_type_shows_its_blocks_in_memory_and_its_weights_counted():
    """A quantized load's row: bytes in memory are the file's blocks, the weights counted apart."""
    n4 = 32 * 3000
    kept = {"tensors": 7, "weights": n4, "bytes_on_disk": 20 * n4 // 32, "bytes_in_memory": 20 * n4 // 32,
            "seconds": 0.01, "kept_quantized": 7}
    event = shard("model.Q4_1.gguf", 1.0, {}, format="gguf")
    event.by_type = {"Q4_1": kept}
    (row,) = tables.by_type_rows(event)
    assert row["in memory as"] == "Q4_1 blocks" and row["weights"] == f"{n4:,}"
    assert row["bits per weight on disk"] == 5.0 and row["memory / disk"] == "1.00x"


# ------------------------------------------------------------------------ notebook 06: explorer


@pytest.fixture(scope="module")
def llm():
    return tracer.load(progress=False)  # the embedded model: sentencepiece pieces, fast


@pytest.fixture(scope="module")
def trace(llm, tmp_path_factory):
    gen = llm.generate("It is a truth universally acknowledged", max_new_tokens=4, do_sample=True, seed=0,
                       capture="full", points=["blocks.0.attn.pattern", "blocks.0.resid_post", "logits"], lens=True)
    return Trace.load(gen.trace.save(tmp_path_factory.mktemp("viz-loading") / "trace"))


def test_header_says_model_device_dtype_tokens_seconds(trace):
    text = re.sub(r"<[^>]+>", " ", summary_html(trace))
    tok = trace.of("tokenize")[0]
    assert "6.33 million parameters, 6 layers, GQA" in text
    assert "cpu, float32" in text and f"{len(tok.ids)} in the prompt + 4 generated" in text
    assert re.search(r"seconds\s+\d+\.\d{3} from the first event", text)
    assert "meta {" not in text and '"device"' not in text  # not a JSON dump


def test_event_times_are_relative_to_the_start_and_differ(trace):
    times = relative_times(trace)
    assert min(times) == 0.0 and all(t >= 0 for t in times)
    assert len({round(t, 6) for t in times}) > len(times) // 2  # not one number for every event
    app = TraceExplorer(trace)
    shown = [re.search(r"\+(\d+\.\d{3}) s", label).group(1) for label, _ in app.events.options]
    assert len(set(shown)) > 1 and min(float(s) for s in shown) == 0.0


def test_pieces_beside_ids_in_events(llm, trace):
    app = TraceExplorer(trace, tokenizer=llm.tokenizer)
    ev = trace.of("sample")[1]
    app.events.value = ev.seq
    details = app.details.value
    assert f"{ev.chosen_id} ‹{ev.chosen_piece}›" in details
    top = ev.stages["raw"]["ids"][0]
    assert f"{top} ‹{llm.tokenizer.id_to_piece(top)}›" in details  # a candidate of a stage, with its piece
    assert f"→ ‹{ev.chosen_piece}›" in dict(map(reversed, app.events.options))[ev.seq]
    assert IN_TRANSFORMERS["sample"][0].qualname in details
    dec = trace.of("decode_step")[0]
    app.events.value = dec.seq
    (i,) = dec.input_ids
    assert f"{i} ‹{llm.tokenizer.id_to_piece(i)}›" in app.details.value
    assert "after the trace's first event" in app.details.value and "LlamaModel.forward" in app.details.value


def test_pieces_without_a_tokenizer_come_from_the_trace():
    trace = Trace([TokenizeEvent(ids=[5, 6], pieces=["Ġthe", "Ċ"]),
                   SampleEvent(chosen_id=9, chosen_piece="Ġcat")])
    pieces = Pieces(trace)
    assert pieces.byte_level  # the space mark Ġ gives a byte-level vocabulary away
    assert pieces.id_piece(6) == "6 ‹⏎›" and pieces.id_piece(9) == "9 ‹Ġcat›" and pieces.id_piece(77) == "77"


def test_dim_names_come_from_the_hook_point_shapes():
    assert plots.dim_names("blocks.3.attn.pattern") == ("batch", "head", "position", "key position")
    assert plots.dim_names("logits") == ("batch", "position", "vocab")
    assert plots.dim_names("blocks.0.attn.k") == ("batch", "position", "KV head", "head dim")
    assert plots.dim_names("not a point") is None


def test_vectors_are_lines_or_bars_and_matrices_heatmaps(trace):
    dec = trace.of("decode_step")[0]
    resid = dec.tensors["blocks.0.resid_post"][0]  # [1, D]: one position
    fig = plots.tensor_slice(resid, names=("position", "hidden"))
    ax = fig.axes[0]
    assert not ax.images and ax.lines and ax.get_xlabel() == f"hidden ({resid.shape[1]})"
    pattern = dec.tensors["blocks.0.attn.pattern"][0, 0]  # [1, S]: one query over the keys
    keys = [f"k{i}" for i in range(pattern.shape[1])]
    ax = plots.tensor_slice(pattern, names=("position", "key position"), xlabels=keys).axes[0]
    assert not ax.images and len(ax.patches) == pattern.shape[1]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"‹{k}›" for k in keys]
    matrix = trace.of("prefill")[0].tensors["blocks.0.attn.pattern"][0, 0]  # [T, S]
    ax = plots.tensor_slice(matrix, names=("position", "key position")).axes[0]
    assert ax.images and ax.get_xlabel().startswith("key position")
    assert plots.tensor_slice(torch.arange(5.0)).axes[0].patches  # 1-D


def test_explorer_draws_each_slice_as_what_it_is(llm, trace):
    app = TraceExplorer(trace, tokenizer=llm.tokenizer)
    d0, d1 = trace.of("decode_step")[:2]
    app.events.value = d0.seq
    app.tensor.value = "blocks.0.attn.pattern"
    assert [s.description for s in app.indices.children] == ["batch", "head"]
    before = app.heat.outputs
    app.events.value = d1.seq  # same tensor name, another event: the picture follows
    assert app.tensor.value == "blocks.0.attn.pattern" and app.heat.outputs != before
    app.events.value = trace.of("sample")[0].seq
    assert app.views.layout.display == "none"  # no empty plot area for an event without tensors


def treescope_payload(page: str) -> str:
    """The text inside treescope's page (it ships it zlib-compressed, base64-encoded)."""
    blobs = re.findall(r'<script type="application/octet-stream" >(.*?)</script>', page, re.S)
    return "".join(zlib.decompress(base64.b64decode(b.strip())).decode("utf-8", "replace") for b in blobs)


def test_treescope_view_of_every_slice(llm, trace):
    pytest.importorskip("treescope")
    app = TraceExplorer(trace, tokenizer=llm.tokenizer)
    app.events.value = trace.of("prefill")[0].seq
    app.tensor.value = "blocks.0.attn.pattern"
    assert app.facets.outputs == ()  # built only when its tab is opened
    app.views.selected_index = 1
    (out,) = app.facets.outputs
    shown = treescope_payload(out["data"]["text/html"])
    assert "Zoom" in shown and "TreescopeFigure" not in shown  # the array view, not the object's tree
    assert "head (8)" in shown and "key position (12)" in shown  # axes named by dimension
    assert "too many" in treescope_html(torch.zeros(1000, 1000))
