"""The CUDA path (the walkthrough's setting: fp16 on one GPU). Skips cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch

import tracer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)"),
]


def test_auto_picks_cuda_and_the_checkpoint_dtype(make_checkpoint):
    folder, _ = make_checkpoint(dtype=torch.float16, shard_size="60KB")
    llm = tracer.load(folder, progress=False)
    assert llm.device.type == "cuda" and llm.dtype == torch.float16
    assert all(e.device.startswith("cuda") for e in llm.load_trace.of("load_shard"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_logits_and_greedy_match_transformers(make_checkpoint, dtype):
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
    assert gen.new_ids == ref[0, len(ids):].tolist()


def test_cuda_trace_reloads_on_cpu(tiny_checkpoint, tmp_path):
    llm = tracer.load(tiny_checkpoint, device="cuda", dtype="float16", progress=False)
    gen = llm.generate("The people", max_new_tokens=4, capture="full", points=["blocks.0.attn.pattern"])
    back = tracer.Trace.load(gen.trace.save(tmp_path / "t"))
    assert back.stages == gen.trace.stages
    assert all(t.device.type == "cpu" for e in back.events for t in e.tensors.values())


def test_cuda_compiled_step_makes_the_eager_tokens(tiny_checkpoint):
    eager = tracer.load(tiny_checkpoint, device="cuda", dtype="float16", progress=False)
    fast = tracer.load(tiny_checkpoint, device="cuda", dtype="float16", progress=False, compile=True)
    kw = dict(max_new_tokens=16, do_sample=False, capture="off")
    assert fast.generate("The people", **kw).new_ids == eager.generate("The people", **kw).new_ids
