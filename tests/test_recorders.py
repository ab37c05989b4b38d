"""tracer/recorders.py and the Decoder's state machine: one recorder per capture policy, and at
most one host read per step in every policy.

Device: the CPU tests count every read of a tensor's values on the host (on a GPU each is a sync
that stalls the pipeline): Python-level ``tolist``/``numpy``/``cpu``/``to("cpu")`` through a
TorchFunctionMode, and the profiler's ``aten::_local_scalar_dense`` (``item``, ``bool``, ``int``,
and the scalar reads torch makes inside its own ops, such as ``multinomial``'s validity checks).
The CUDA test at the end (skipped without a GPU) counts the syncs themselves.
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

import tracer
from tracer import generate, recorders
from tracer.errors import GenerationError
from tracer.generate import State
from tracer.trace import CAPTURE_POLICIES

GREEDY = dict(do_sample=False, repetition_penalty=1.2)
SAMPLE = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2)
# Each recorder, with everything it can keep switched on.
POLICIES = {
    "off": dict(capture="off"),
    "light": dict(capture="light"),
    "light+lens": dict(capture="light", lens=True),
    "full+lens": dict(capture="full", points=["blocks.0.attn.pattern", "blocks.*.resid_post", "logits"], lens=True),
}
PROMPT = "The people of the world"


def _names_the_host(args, kwargs) -> bool:
    """``x.to("cpu")``: the string, as code moving a tensor to the host writes it. A torch.device
    argument is taken as another tensor's device (``ids.to(scores.device)``), which here on the
    CPU is the CPU too, and on a GPU no host read."""
    return any(isinstance(v, str) and v == "cpu" for v in [*args[1:], *(kwargs or {}).values()])


class _Reads(TorchFunctionMode):
    """Python-level host reads (``item``/``bool`` show in the profiler instead) and uploads."""

    READS = {"tolist", "numpy", "cpu"}
    UPLOADS = {"tensor", "as_tensor"}  # a new tensor from host values: an upload per call

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.uploads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS or (name == "to" and _names_the_host(args, kwargs)):
            self.reads.append(name)
        if name in self.UPLOADS:
            self.uploads.append(name)
        return func(*args, **(kwargs or {}))


@contextmanager
def counted():
    """Yields a dict filled when the block ends: ``reads`` (every host read) and ``uploads``."""
    out: dict[str, list[str]] = {}
    with profile(activities=[ProfilerActivity.CPU]) as prof, _Reads() as mode:
        yield out
    scalar = [e.name for e in prof.events() if e.name == "aten::_local_scalar_dense"]
    out["reads"], out["uploads"] = mode.reads + scalar, mode.uploads


@pytest.mark.parametrize("settings", [GREEDY, SAMPLE], ids=["greedy", "sample"])
@pytest.mark.parametrize("policy", POLICIES)
def test_each_step_reads_the_host_once_and_uploads_nothing(tiny_llm, policy, settings):
    """Device: CPU, counting what would each be a GPU sync. Prefill and decode steps alike: the
    chosen id, the finiteness check and everything the recorder keeps ride on one copy; a forced
    token outside the recorded top-k (once a second read, for its rank) too."""
    dec = tiny_llm.decoder(PROMPT, max_new_tokens=6, seed=0, **POLICIES[policy], **settings)
    dec.eos_ids = ()
    for i in range(5):
        force = None
        if i == 3:  # the least likely token: outside every top-k
            force = int(tiny_llm.logits(dec.ids)[-1].argmin())
        with counted() as seen:
            dec.step(force_id=force)
        assert seen["reads"] == ["tolist"], (i, seen["reads"])
        assert seen["uploads"] == [], (i, seen["uploads"])
    if policy != "off":
        ev = dec.trace.of("sample")[3]
        assert ev.forced and ev.chosen_id == dec.new_ids[3] == ev.candidate_ids[-1]
        assert ev.chosen_id not in ev.stages["repetition_penalty"]["ids"]  # outside the top-k


def test_the_compiled_step_reads_no_scalar_and_uploads_no_position(tiny_checkpoint):
    """Device: CPU. capture="off" on the compiled step: the position is refilled on the device,
    not made from a host list each token (``aten::lift_fresh``: a tensor made from host values, as
    ``torch.tensor`` or a Python scalar written into a tensor). Only the profiler counts here: a
    TorchFunctionMode would make Dynamo recompile."""
    llm = tracer.load(tiny_checkpoint, device="cpu", dtype="float32", progress=False, compile=True)
    dec = llm.decoder(PROMPT, max_new_tokens=6, seed=0, capture="off", **SAMPLE)
    dec.eos_ids = ()
    dec.run(2)  # the prefill, then a first decode step that compiles
    assert dec.trace.meta["step"] == "compiled-block"
    for _ in range(3):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            dec.step()
        names = [e.name for e in prof.events()]
        assert "aten::_local_scalar_dense" not in names and "aten::lift_fresh" not in names
    eager = tracer.load(tiny_checkpoint, device="cpu", dtype="float32", progress=False)
    again = eager.decoder(PROMPT, max_new_tokens=6, seed=0, capture="off", **SAMPLE)
    again.eos_ids = ()
    again.run()
    dec.run()
    assert dec.new_ids == again.new_ids


def test_the_decoder_names_no_policy_and_every_policy_has_a_recorder():
    """The policy picks its recorder once (recorders.recorder_for); the Decoder asks the recorder."""
    source = inspect.getsource(generate)
    assert not any(f'"{name}"' in source for name in CAPTURE_POLICIES)
    assert tuple(recorders.RECORDERS) == CAPTURE_POLICIES
    assert not recorders.NullRecorder.records and recorders.LightRecorder.records
    assert issubclass(recorders.FullRecorder, recorders.LightRecorder)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_recorder_records_the_same_choices(tiny_llm, policy):
    """The recorder only records: the tokens, and the prob/rank where kept, come from the choice."""
    kw = dict(max_new_tokens=8, seed=5, **SAMPLE)
    want = tiny_llm.generate(PROMPT, capture="off", **kw).new_ids
    gen = tiny_llm.generate(PROMPT, **POLICIES[policy], **kw)
    assert gen.new_ids == want
    for rec in gen.steps:
        assert (rec.rank >= 0 and 0 < rec.prob <= 1) if policy != "off" else rec.rank == -1


def test_states_run_fresh_then_decoding_then_finished(tiny_llm):
    dec = tiny_llm.decoder(PROMPT, max_new_tokens=3, capture="light", **GREEDY)
    dec.eos_ids = ()
    assert dec.state is State.FRESH and not dec.finished and dec.new_ids == []
    dec.step()
    assert dec.state is State.DECODING and dec.trace.stages[-2:] == ["prefill", "sample"]
    dec.step()
    assert dec.state is State.DECODING and dec.trace.stages[-2:] == ["decode_step", "sample"]
    dec.step()
    assert dec.state is State.FINISHED and dec.finished and dec.finish_reason == "max_new_tokens"
    with pytest.raises(GenerationError, match="finished"):
        dec.step()
    # A branch at step 0 starts FRESH again: it prefills the prompt, then decodes on.
    other = dec.branch(0, dec.new_ids[1])
    assert other.state is State.DECODING and other.trace.of("prefill")[-1].step == 0
    assert other.new_ids == [dec.new_ids[1]] and other.ids == dec.prompt_ids + other.new_ids
    assert dec.new_ids != other.new_ids and dec.finished  # the original is untouched


def test_the_forward_reads_the_ids_from_the_device_buffer(tiny_llm):
    """What the loop runs on is the Tokens object: the forward input is a view of its buffer."""
    dec = tiny_llm.decoder(PROMPT, max_new_tokens=3, capture="off", **GREEDY)
    dec.eos_ids = ()
    dec.run()
    tokens = dec.tokens
    assert tokens.buffer.tolist() == dec.ids
    last = tokens.last(1)
    assert last.shape == (1, 1) and last.data_ptr() == tokens.buffer[len(dec.ids) - 1:].data_ptr()


def test_full_capture_copies_are_the_hook_tensors_themselves(tiny_llm):
    """``host_copy``: on the CPU a copy (the tensor may be overwritten by the next step), on CUDA a
    non-blocking copy into pinned memory (checked where a GPU is at hand)."""
    x = torch.arange(6.0).view(2, 3)
    y = recorders.host_copy(x)
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr() and y.stride() == x.stride()
    if torch.cuda.is_available():
        z = recorders.host_copy(x.cuda())
        torch.cuda.synchronize()
        assert z.is_pinned() and torch.equal(z, x)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("policy", POLICIES)
def test_cuda_syncs_at_most_once_per_step(tiny_checkpoint, policy, compiled):
    """Device: CUDA. torch's sync debug mode warns at every synchronizing operation."""
    if compiled and POLICIES[policy]["capture"] != "off":
        pytest.skip("traced runs take the eager model")
    llm = tracer.load(tiny_checkpoint, device="cuda", dtype="float16", progress=False, compile=compiled)
    dec = llm.decoder(PROMPT, max_new_tokens=8, seed=0, **POLICIES[policy], **SAMPLE)
    dec.eos_ids = ()
    dec.run(2)  # the prefill, and a decode step that may compile
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("warn")
        for _ in range(4):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                dec.step()
            syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
            assert len(syncs) <= 1, syncs
    finally:
        torch.cuda.set_sync_debug_mode(0)
