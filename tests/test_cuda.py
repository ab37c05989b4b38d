"""The CUDA path (the walkthrough's setting: fp16 on one GPU). Skips cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch

import tracer
from benchmarks import gpu_check

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)"),
]


@pytest.fixture(scope="module")
def cpu_tests():
    """For the modules of CPU tests (``pytestmark = pytest.mark.usefixtures("cpu_tests")``; not
    used here): there ``tracer.load`` without an explicit device fails, on the CPU too, since on a
    GPU host "auto" is CUDA and such a test would silently be about another device (a CPU kernel
    expected on a CUDA model, CUDA logits compared with CPU ones). Module scope: it is in place
    before the module's own module-scoped fixtures load anything."""
    from tracer import api

    real = api.pick_device

    def named(device="auto"):
        if str(device) == "auto":
            raise AssertionError("a CPU test called tracer.load without device=: pass device='cpu' "
                                 "(on a GPU host 'auto' is CUDA)")
        return real(device)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "pick_device", named)
        yield


def test_auto_picks_cuda_and_the_checkpoint_dtype(make_checkpoint):
    """Device: CUDA, chosen by device="auto" (the one test here that leans on "auto")."""
    folder, _ = make_checkpoint(dtype=torch.float16, shard_size="60KB")
    llm = tracer.load(folder, progress=False)
    assert llm.device.type == "cuda" and llm.dtype == torch.float16
    assert all(e.device.startswith("cuda") for e in llm.load_trace.of("load_shard"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_logits_and_greedy_match_transformers(make_checkpoint, dtype):
    """Device: CUDA. Logits within the dtype's rounding of transformers' on the same GPU."""
    transformers = pytest.importorskip("transformers")
    folder, _ = make_checkpoint(dtype=torch.float16, shard_size="60KB")
    ours = tracer.load(folder, device="cuda", dtype=dtype, progress=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).cuda().eval()
    ids = ours.tokenizer.encode("The people of the world came back to the little state")
    x = torch.tensor([ids], device="cuda")
    with torch.no_grad():
        expected = theirs(x).logits[0].float()
    got = ours.logits(ids)
    tol = (2e-2 if dtype == "float16" else 6e-2) * expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=tol, rtol=0)
    gen = ours.generate(ids, max_new_tokens=20, do_sample=False, capture="off")
    ref = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False)
    # Equal, or parted only where the two best logits are closer than the dtype's rounding.
    judged = gpu_check.greedy_judged(ours, ids, gen.new_ids, ref[0, len(ids):].tolist())
    assert judged["ok"], judged


def test_cuda_trace_reloads_on_cpu(tiny_checkpoint, tmp_path):
    """Device: CUDA, the trace saved and read back on the CPU."""
    llm = tracer.load(tiny_checkpoint, device="cuda", dtype="float16", progress=False)
    gen = llm.generate("The people", max_new_tokens=4, capture="full", points=["blocks.0.attn.pattern"])
    back = tracer.Trace.load(gen.trace.save(tmp_path / "t"))
    assert back.stages == gen.trace.stages
    assert all(t.device.type == "cpu" for e in back.events for t in e.tensors.values())


def test_cuda_compiled_step_makes_the_eager_tokens(tiny_checkpoint):
    """Device: CUDA. load(compile=True) decodes the eager model's greedy ids (equal, or parted at a
    float16 near tie: the fused kernels round a little differently)."""
    eager = tracer.load(tiny_checkpoint, device="cuda", dtype="float16", progress=False)
    fast = tracer.load(tiny_checkpoint, device="cuda", dtype="float16", progress=False, compile=True)
    kw = dict(max_new_tokens=16, do_sample=False, capture="off")
    ids = eager.tokenizer.encode("The people")
    got = fast.generate(ids, **kw)
    assert got.trace.meta["step"] == "compiled-block"
    judged = gpu_check.greedy_judged(eager, ids, got.new_ids, eager.generate(ids, **kw).new_ids)
    assert judged["ok"], judged


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_cuda_load_equals_the_cpu_load(make_checkpoint, dtype):
    """Device: CUDA. Stored float16, staged through pinned buffers and cast on the GPU: every weight
    equals the CPU load's (an IEEE cast rounds the same on either side)."""
    folder, _ = make_checkpoint(dtype=torch.float16, shard_size="60KB")
    gpu = tracer.load(folder, device="cuda", dtype=dtype, progress=False)
    cpu = tracer.load(folder, device="cpu", dtype=dtype, progress=False)
    for (name, a), b in zip(cpu.model.state_dict().items(), gpu.model.state_dict().values()):
        assert b.device.type == "cuda" and torch.equal(a, b.cpu()), name


def test_cuda_load_synchronises_once_per_shard(make_checkpoint):
    """Device: CUDA, with the real pinned buffers and uploads; only the sync is counted."""
    from tracer import checkpoint, resolution
    from tracer.model import LlamaModel

    folder, _ = make_checkpoint(dtype=torch.float16, shard_size="60KB")
    resolved = resolution.resolve(folder)
    cfg = checkpoint.read_config(resolved)
    syncs = []
    upload = checkpoint.StagedUpload("cuda", staging_bytes=4096,
                                     synchronize=lambda: syncs.append(torch.cuda.synchronize()))
    model = LlamaModel(cfg, device="meta", dtype=torch.float32).allocate("cuda")
    reports = list(checkpoint.load_weights(model, resolved, upload=upload))
    assert len(syncs) == len(resolved.weight_files) == len(reports) >= 2
    cpu = LlamaModel(cfg, device="meta", dtype=torch.float32).allocate("cpu")
    list(checkpoint.load_weights(cpu, resolved))
    for (name, a), b in zip(cpu.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b.cpu()), name


def test_cuda_gguf_load_equals_the_cpu_load(gguf_file):
    """Device: CUDA. Dequantized on the host, uploaded in float32 pieces, cast to float16 on the GPU."""
    path = gguf_file("gpt2-q4_0-tied").path
    gpu = tracer.load(path, device="cuda", dtype="float16", progress=False)
    cpu = tracer.load(path, device="cpu", dtype="float16", progress=False)
    for (name, a), b in zip(cpu.model.state_dict().items(), gpu.model.state_dict().values()):
        assert torch.equal(a, b.cpu()), name


# --- What benchmarks/gpu_check.py proves, as tests. Device: CUDA. -------------------------------


def _fp16(tiny_checkpoint):
    """The tiny checkpoint on the GPU in float16, never stopping at EOS (steps compare all the way)."""
    from dataclasses import replace

    llm = tracer.load(tiny_checkpoint, device="cuda", dtype="float16", progress=False)
    llm.defaults = replace(llm.defaults, eos_token_ids=())
    return llm


def test_cuda_seeded_samples_match_transformers(make_checkpoint):
    """Device: CUDA. Our draws on a seeded generator of the GPU equal transformers' after
    torch.manual_seed, for every seed (float32: float16 rounds the two runtimes' logits apart, and
    a draw at a boundary may then differ; benchmarks/gpu_check.py reports float16 too)."""
    folder, _ = make_checkpoint(dtype=torch.float16, shard_size="60KB")
    ours, theirs = gpu_check.load_pair(folder, torch.device("cuda"), torch.float32)
    prompt = ours.tokenizer.encode("The people of the world")
    result = gpu_check.seeded(ours, theirs, prompt, 40)
    assert result["ok"], result


def test_cuda_each_capture_policy_makes_the_same_tokens_with_at_most_one_sync_per_step(tiny_checkpoint):
    """Device: CUDA. off, light and full make the same greedy and seeded ids (the same kernels
    run in each), the compiled step the same greedy ids up to a float16 near tie (its fused
    kernels round a little differently); and each decode step makes at most one host sync (the
    chosen id, with the light summaries), counted by torch.cuda.set_sync_debug_mode."""
    llm = _fp16(tiny_checkpoint)
    prompt = llm.tokenizer.encode("The people")
    greedy = llm.generate(prompt, max_new_tokens=12, do_sample=False, capture="off").new_ids
    drawn = llm.generate(prompt, max_new_tokens=12, seed=3, capture="off", **gpu_check.SAMPLING).new_ids
    for capture in gpu_check.POLICIES:
        points = gpu_check.FULL_POINTS if capture == "full" else ()
        kw = dict(max_new_tokens=12, capture=capture, points=points)
        assert llm.generate(prompt, do_sample=False, **kw).new_ids == greedy, capture
        assert llm.generate(prompt, seed=3, **kw, **gpu_check.SAMPLING).new_ids == drawn, capture
        syncs = gpu_check.syncs_per_step(llm, prompt, capture, 8)
        assert syncs["per_step"] <= gpu_check.SYNC_BUDGET, (capture, syncs)
    llm.compile_step()
    compiled = llm.generate(prompt, max_new_tokens=12, do_sample=False, capture="off")
    assert compiled.trace.meta["step"] == "compiled-block"
    judged = gpu_check.greedy_judged(llm, prompt, compiled.new_ids, greedy)
    assert judged["ok"], judged
    syncs = gpu_check.syncs_per_step(llm, prompt, "off", 8)
    assert syncs["per_step"] <= gpu_check.SYNC_BUDGET, ("compiled", syncs)


def test_cuda_compiled_step_replays_cuda_graphs_and_equals_the_eager_step(tiny_checkpoint):
    """Device: CUDA. The compiled step takes CUDA graphs (no graph skipped by inductor), reads its
    ints from its own static buffers (StaticStep.at), and its logits equal the eager static
    step's within float16's rounding, for a first cache and for a second one (a new generation:
    the graphs are recorded again over the new cache's addresses)."""
    from torch._dynamo.utils import counters

    from tracer.fast import CompiledStep, StaticStep

    llm = _fp16(tiny_checkpoint)
    step = CompiledStep(llm.model)
    assert step.cuda_graphs
    skips = counters["inductor"]["cudagraph_skips"]
    prompt = llm.tokenizer.encode("The people of the world")
    eager = StaticStep(llm.model, attention=step.attention)
    for _ in range(2):
        worst, timings = gpu_check.compare_steps(llm.model, step, eager, prompt, steps=16)
        assert worst <= 2e-2, worst
    assert counters["inductor"]["cudagraph_skips"] == skips
    assert len(step.compile_seconds) == 1 and step.fresh_starts == 0


def test_cuda_load_builds_no_kernel_and_refuses_matvec_kernel(tiny_checkpoint, monkeypatch, tmp_path):
    """Device: CUDA. A CUDA load runs no compiler (not even ``cc --version``) and keeps torch's
    products; matvec="kernel" there is a one-line DeviceError, not torch's products in silence."""
    from tracer.errors import DeviceError
    from tracer.kernels import build

    calls = []

    def recording(args, what, timeout):
        calls.append(list(args))
        raise build.Unavailable("no compiler in this test")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(build, "run_compiler", recording)
    build.library.cache_clear()
    try:
        llm = tracer.load(tiny_checkpoint, device="cuda", progress=False)
        assert llm.load_trace.meta["matvec"] == "torch" and calls == []
        with pytest.raises(DeviceError, match="matvec='kernel' runs on the CPU only"):
            tracer.load(tiny_checkpoint, device="cuda", progress=False, matvec="kernel")
        assert calls == [] and build.library.cache_info().currsize == 0
    finally:
        build.library.cache_clear()
