"""tracer.trace + generation: the stage sequence, what events hold, capture policies, save/reload."""

from __future__ import annotations

import json
import os

import pytest
import torch

import tracer
from tracer import sampling
from tracer.errors import TraceError


def test_stage_sequence_is_exactly_the_walkthrough(tiny_llm):
    gen = tiny_llm.generate("The people of the world", max_new_tokens=6, do_sample=False, capture="light")
    n = len(gen.new_ids)
    shards = len(tiny_llm.resolved.weight_files)
    expected = (["config", "resolve"] + ["load_shard"] * shards + ["tokenize", "prefill", "sample"]
                + ["decode_step", "sample"] * (n - 1) + ["detokenize"])
    assert gen.trace.stages == expected
    assert [e.seq for e in gen.trace.events] == list(range(len(expected)))
    times = [e.time for e in gen.trace.events[len(tiny_llm.load_trace):]]
    assert times == sorted(times)
    assert set(gen.trace.stages) == set(tracer.STAGES)


def test_events_carry_their_summaries(tiny_llm):
    gen = tiny_llm.generate("The people of the world", max_new_tokens=4, do_sample=False, lens=True)
    cfg = gen.trace.of("config")[0]
    assert cfg.num_parameters == tiny_llm.config.num_parameters and len(cfg.memory_table) == 3
    tok = gen.trace.of("tokenize")[0]
    assert tok.ids == gen.prompt_ids and tok.pieces[0] == "<s>" and tok.added_bos
    pre = gen.trace.of("prefill")[0]
    assert pre.positions == [0, len(gen.prompt_ids) - 1]
    assert pre.kv_cache["length"] == len(gen.prompt_ids)
    assert len(pre.logit_lens) == tiny_llm.config.num_hidden_layers == len(pre.residual_norms)
    # The last layer's lens is the model's own prediction.
    assert pre.logit_lens[-1]["ids"][0] == pre.top_logits["ids"][0]
    steps = gen.trace.of("decode_step")
    assert [e.kv_cache["length"] for e in steps] == [len(gen.prompt_ids) + i + 1 for i in range(len(steps))]
    det = gen.trace.of("detokenize")[0]
    assert det.new_ids == gen.new_ids and det.text == gen.text


def test_recorded_sampling_stages_match_sampling_recomputed_from_raw_logits(tiny_llm):
    settings = dict(do_sample=True, temperature=0.7, top_k=40, top_p=0.95, repetition_penalty=1.1)
    gen = tiny_llm.generate("The people of the world", max_new_tokens=8, seed=11, capture="full",
                            points=["logits"], **settings)
    forwards = [e for e in gen.trace.events if e.stage in ("prefill", "decode_step")]
    samples = gen.trace.of("sample")
    assert len(forwards) == len(samples) == len(gen.new_ids)
    s = sampling.SamplingSettings(**settings)
    for i, (fwd, ev) in enumerate(zip(forwards, samples)):
        raw = fwd.tensors["logits"][0, -1].float()
        prev = torch.tensor([gen.prompt_ids + gen.new_ids[:i]])
        stages = sampling.stage_scores(raw[None], prev, s)
        for name in sampling.STAGES:
            rec = ev.stages[name]
            scores = stages[name][0]
            probs = scores if name == "final" else torch.softmax(scores, -1)
            assert rec["ids"][0] == int(torch.argmax(scores)), name
            torch.testing.assert_close(torch.tensor(rec["probs"]), probs[rec["ids"]], atol=1e-6, rtol=0)
        assert ev.chosen_id == gen.new_ids[i]
        final = stages["final"][0]
        assert ev.chosen_prob == pytest.approx(final[ev.chosen_id].item(), abs=1e-6)
        assert ev.chosen_rank == int((final > final[ev.chosen_id]).sum())
        assert ev.candidates == int((final > 0).sum())


def test_full_capture_records_live_with_the_cache(tiny_llm):
    gen = tiny_llm.generate("The people", max_new_tokens=4, do_sample=False, capture="full",
                            points=["blocks.0.attn.pattern", "blocks.*.resid_post"])
    pre, *steps = [e for e in gen.trace.events if e.stage in ("prefill", "decode_step")]
    T = len(gen.prompt_ids)
    H = tiny_llm.config.num_attention_heads
    assert pre.tensors["blocks.0.attn.pattern"].shape == (1, H, T, T)
    for i, e in enumerate(steps):
        assert e.tensors["blocks.0.attn.pattern"].shape == (1, H, 1, T + i + 1)  # one query, growing keys
        assert e.tensors["blocks.1.resid_post"].shape[1] == 1


def test_full_capture_budget_is_refused_before_recording(tiny_llm):
    with pytest.raises(TraceError, match="budget"):
        tiny_llm.generate("The people", max_new_tokens=3, capture="full", points=["*"], budget_bytes=1000)
    assert not tiny_llm.model.hooks.any_active  # nothing left attached


def test_capture_off_keeps_no_events(tiny_llm):
    gen = tiny_llm.generate("The people", max_new_tokens=3, do_sample=False, capture="off")
    assert gen.trace.events == [] and len(gen.new_ids) == 3


def test_light_trace_stays_small(tiny_llm, tmp_path):
    gen = tiny_llm.generate("The people", max_new_tokens=120, do_sample=True, seed=0, capture="light")
    gen.trace.save(tmp_path / "t")
    size = sum(f.stat().st_size for f in (tmp_path / "t").iterdir())
    per_token = size / len(gen.new_ids)
    # Light events do not grow with the model (top-k lists, not vocab vectors): 512 tokens < 50 MB.
    assert per_token * 512 < 50e6, per_token


def test_save_and_reload_is_bit_exact(tiny_llm, tmp_path):
    gen = tiny_llm.generate("The people of the world", max_new_tokens=5, do_sample=True, seed=1,
                            capture="full", points=["blocks.0.attn.pattern", "logits"], lens=True)
    path = gen.trace.save(tmp_path / "trace")
    back = tracer.Trace.load(path)
    assert back.stages == gen.trace.stages
    for a, b in zip(gen.trace.events, back.events):
        assert type(a) is type(b)
        assert json.dumps(a.to_json(), sort_keys=True) == json.dumps(b.to_json(), sort_keys=True)
        assert a.tensors.keys() == b.tensors.keys()
        for k in a.tensors:
            assert a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k])


def test_tampered_or_truncated_trace_fails_to_load(tiny_llm, tmp_path):
    gen = tiny_llm.generate("The people", max_new_tokens=2, capture="full", points=["logits"])
    path = gen.trace.save(tmp_path / "trace")
    events = path / "events.json"
    events.write_text(events.read_text().replace('"sample"', '"sampel"', 1))
    with pytest.raises(TraceError, match="events.json"):
        tracer.Trace.load(path)
    path = gen.trace.save(tmp_path / "trace2")
    tensors = path / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-10])
    with pytest.raises(TraceError, match="truncated or edited"):
        tracer.Trace.load(path)


def test_saving_over_an_old_trace_replaces_it_whole(tiny_llm, tmp_path):
    a = tiny_llm.generate("The people", max_new_tokens=2, do_sample=False)
    b = tiny_llm.generate("The people", max_new_tokens=4, do_sample=False)
    a.trace.save(tmp_path / "t")
    b.trace.save(tmp_path / "t")
    assert tracer.Trace.load(tmp_path / "t").stages == b.trace.stages
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_decoder_steps_branches_and_changes_settings(tiny_llm):
    import dataclasses

    dec = tiny_llm.decoder("The people of the world", max_new_tokens=10, do_sample=False)
    dec.step()
    dec.step()
    dec.settings = dataclasses.replace(dec.settings, do_sample=True, temperature=1.5)
    dec.step()
    assert len(dec.new_ids) == 3 and dec.trace.of("sample")[-1].settings["temperature"] == 1.5
    first = dec.trace.of("sample")[1]
    alternative = next(i for i in first.stages["final"]["ids"] if i != dec.new_ids[1])
    other = dec.branch(1, alternative)
    assert other.new_ids == [dec.new_ids[0], alternative] and dec.new_ids[1] != alternative
    assert other.trace.of("sample")[-1].forced
    # The branch continues from its own cache: equal to generating from the branched ids directly.
    other.settings = dataclasses.replace(other.settings, do_sample=False)
    other.run(3)
    direct = tiny_llm.generate(dec.prompt_ids + other.new_ids[:2], max_new_tokens=3, do_sample=False)
    assert other.new_ids[2:] == direct.new_ids


def _ballast(nbytes: int):
    """``nbytes`` of fresh, written memory: an anonymous map with every page touched, so RSS
    rises by ``nbytes`` (memory from malloc may reuse pages a long test session already holds)."""
    import mmap

    mm = mmap.mmap(-1, nbytes)
    for offset in range(0, nbytes, mmap.PAGESIZE):
        mm[offset] = 1
    return mm


def test_memory_probe_keeps_one_file_open_and_closes_it():
    """A traced step reads RSS through a kept fd (pread), not an open per step."""
    import gc

    from tracer.trace import MemoryProbe, memory_snapshot

    probe = MemoryProbe("cpu")
    first = probe.snapshot()["rss_bytes"]
    fd = probe._fd
    ballast = _ballast(64 * 1024**2)
    assert probe.snapshot()["rss_bytes"] >= first + 48 * 1024**2
    assert probe._fd == fd  # the same file, read again
    assert abs(memory_snapshot("cpu")["rss_bytes"] - probe.snapshot()["rss_bytes"]) < 16 * 1024**2
    probe.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    assert probe.snapshot()["rss_bytes"] > 0  # reopens after close
    fd = probe._fd
    del probe, ballast
    gc.collect()
    with pytest.raises(OSError):  # the finalizer closed it with the probe
        os.fstat(fd)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_memory_probe_in_a_forked_child_reads_the_child():
    """/proc/self is resolved when the file is opened: a child must not read its parent's RSS."""
    from tracer.trace import MemoryProbe

    probe = MemoryProbe("cpu")
    parent = probe.snapshot()["rss_bytes"]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: read, grow by 256 MB, read again, through the inherited probe
        try:
            before = probe.snapshot()["rss_bytes"]
            ballast = _ballast(256 * 1024**2)
            os.write(w, str(probe.snapshot()["rss_bytes"] - before).encode())
            del ballast
        finally:
            os._exit(0)
    os.close(w)
    child_growth = int(os.read(r, 64))
    os.close(r)
    os.waitpid(pid, 0)
    # Reading the parent's statm through an inherited fd would see no growth at all.
    assert child_growth >= 200 * 1024**2
    assert probe.snapshot()["rss_bytes"] < parent + 100 * 1024**2  # the parent did not grow


# --- trace.stage, event order, events built from reports (no model: the CPU) -------------------


def test_stage_times_the_block_and_adds_the_event_it_sets():
    import time

    from tracer.trace import ResolveEvent, Trace

    trace = Trace()
    before = time.time()
    with trace.stage("resolve", memory="cpu") as stage:
        time.sleep(0.02)
        stage.event = ResolveEvent(source="here")
    (event,) = trace.events
    assert event.source == "here" and event.seq == 0 and before <= event.time <= before + 1
    assert 0.02 <= event.seconds < 5 and event.memory["rss_bytes"] > 0
    with trace.stage("tokenize"):  # capture="off": the block sets no event, nothing is recorded
        pass
    with pytest.raises(ValueError), trace.stage("resolve") as stage:
        stage.event = ResolveEvent()
        raise ValueError("a failed stage")
    assert len(trace) == 1
    with pytest.raises(TraceError, match="'tokenize' recorded a 'resolve' event"), trace.stage("tokenize") as stage:
        stage.event = ResolveEvent()
    with pytest.raises(TraceError, match="unknown stage"), trace.stage("prefil"):
        pass


def test_the_trace_lists_the_load_stages_in_walkthrough_order():
    """Resolution runs before the config is read; the trace still reads config, resolve, load_shard."""
    from tracer.trace import (
        ConfigEvent,
        DetokenizeEvent,
        LoadShardEvent,
        ResolveEvent,
        TokenizeEvent,
        Trace,
    )

    trace = Trace()
    for event in (ResolveEvent(), ConfigEvent(), LoadShardEvent(), LoadShardEvent(), TokenizeEvent()):
        trace.add(event)
    assert trace.stages == ["config", "resolve", "load_shard", "load_shard", "tokenize"]
    assert [e.seq for e in trace.events] == [0, 1, 2, 3, 4]
    trace.add(DetokenizeEvent())
    trace.add(ConfigEvent())  # after a generation: where it happens, not moved into the load
    assert trace.stages[-2:] == ["detokenize", "config"] and trace.events[-1].seq == 6


# The keys of a load_shard event in a saved trace (format version 1): traces already saved carry
# exactly these, so the event must keep them.
LOAD_SHARD_KEYS = {
    "stage", "seq", "time", "seconds", "memory", "tensor_names", "file", "index", "count",
    "bytes_on_disk", "num_tensors", "bytes_read", "bytes_in_memory", "casts", "device", "dtype",
    "unexpected", "tensors_mapped", "format", "by_type",
}


def test_a_load_shard_event_is_the_loaders_report_and_keeps_the_saved_keys(tmp_path):
    import dataclasses

    from tracer.checkpoint import ShardReport
    from tracer.trace import LoadShardEvent, Trace

    report = ShardReport("model-00001-of-00002.safetensors", 0, 2, 1000, "safetensors", num_tensors=7,
                         bytes_read=900, bytes_in_memory=1800, casts={"float16->float32": 7}, device="cpu",
                         dtype="float32", seconds=0.25, unexpected=["x"], tensors_mapped=0,
                         by_type={"float16": {"tensors": 7, "bytes_on_disk": 900, "bytes_in_memory": 1800,
                                              "seconds": 0.2}})
    event = LoadShardEvent.from_report(report, memory={"rss_bytes": 5})
    for f in dataclasses.fields(ShardReport):
        assert getattr(event, f.name) == getattr(report, f.name), f.name
    assert event.memory == {"rss_bytes": 5} and event.tensors == {}
    assert set(event.to_json()) == LOAD_SHARD_KEYS
    path = Trace([event]).save(tmp_path / "t")
    (saved,) = json.loads((path / "events.json").read_text())["events"]
    assert set(saved) == LOAD_SHARD_KEYS
    (back,) = Trace.load(path).events
    assert back.to_json() == event.to_json()
