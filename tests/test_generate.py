"""The Decoder (tracer/generate.py): every capture policy makes the same tokens, exactly."""

import pytest
import torch

import tracer


@pytest.fixture(scope="module")
def embedded_fp16():
    return tracer.load(None, dtype="float16", progress=False)


@pytest.mark.parametrize("capture", ["off", "light", "full"])
def test_forced_ids_above_float16_range_are_exact(embedded_fp16, capture):
    """The step's host copy carries the id as float32: 4001 does not survive float16 (-> 4000)."""
    llm = embedded_fp16
    assert llm.config.vocab_size > 4001
    kw = {"points": ["logits"]} if capture == "full" else {}
    dec = llm.decoder(llm.tokenizer.encode("Once upon a time"), max_new_tokens=3, capture=capture, **kw)
    dec.step()
    assert dec.step(force_id=4001).token_id == 4001
    assert dec.ids[-1] == 4001
    dec.step()  # the forced id is what the next forward reads from the device buffer
    assert len(dec.new_ids) == 3


def test_policies_agree_on_tokens(embedded_fp16):
    llm = embedded_fp16
    ids = llm.tokenizer.encode("The people of the world")
    runs = {}
    for capture in ("off", "light", "full"):
        kw = {"points": ["blocks.0.attn.pattern"]} if capture == "full" else {}
        runs[capture] = llm.generate(ids, max_new_tokens=12, do_sample=True, seed=3, temperature=0.8,
                                     top_k=40, top_p=0.95, repetition_penalty=1.1, capture=capture,
                                     **kw).new_ids
    assert runs["off"] == runs["light"] == runs["full"]


def test_rank_and_probability_of_a_forced_token_outside_the_top_k(embedded_fp16):
    """Inside the recorded top-k the rank is read on the host; outside it the device is asked."""
    from tracer import sampling

    llm = embedded_fp16
    ids = llm.tokenizer.encode("Once upon a time")
    dec = llm.decoder(ids, max_new_tokens=2, capture="light", do_sample=False)
    logits = llm.logits(ids)[-1]
    final = sampling.stage_scores(logits[None], torch.tensor([ids]), dec.settings)["final"][0]
    for token in (int(final.argmax()), int(final.argmin())):
        dec = llm.decoder(ids, max_new_tokens=2, capture="light", do_sample=False)
        dec.step(force_id=token)
        ev = dec.trace.of("sample")[-1]
        assert ev.chosen_rank == int((final > final[token]).sum())
        assert ev.chosen_prob == pytest.approx(float(final[token]), rel=1e-3, abs=1e-9)
    assert ev.chosen_rank > dec.capture.top_n  # the second one really was outside the list


def test_greedy_tie_at_the_top_takes_the_first_index_in_every_policy(tiny_checkpoint):
    """Light capture reads the greedy token off the recorded top-k; among equal scores topk's
    order is unspecified, while argmax (and transformers) takes the first index."""
    llm = tracer.load(tiny_checkpoint, device="cpu", dtype="float32", progress=False)
    ids = llm.tokenizer.encode("Once upon a time")
    weight = llm.model.output_weight()
    original = weight.detach().clone()
    top = int(llm.logits(ids)[-1].argmax())
    V = llm.config.vocab_size
    topk_disagreed = 0
    for twin in sorted({0, 5, top // 2, (top + V) // 2, V - 1} - {top}):
        with torch.no_grad():
            weight.copy_(original)
            weight[twin] = original[top]  # two tokens whose logits are always equal
        logits = llm.logits(ids)[-1]
        assert logits[twin] == logits[top] == logits.max()
        first = min(twin, top)
        topk_disagreed += int(torch.topk(logits, 20).indices[0]) != first
        for capture in ("off", "light", "full"):
            kw = {"points": ["logits"]} if capture == "full" else {}
            dec = llm.decoder(ids, max_new_tokens=1, do_sample=False, capture=capture, **kw)
            assert dec.step().token_id == first, (capture, twin, top)
            if capture != "off":
                assert dec.trace.of("sample")[-1].chosen_rank == 0
    assert topk_disagreed, "no placement put the tie out of argmax's order: the test proved nothing"


@pytest.mark.parametrize("capture", ["off", "light"])
def test_a_branch_keeps_the_runs_random_stream_after_its_step(tiny_llm, capture):
    """Sampling: branch(s, x) goes on with the random state the run had right after step s. So
    branching with the token actually taken reproduces the run, and a branch does not depend on
    how far the run went on before it was branched."""
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.3, top_k=0, seed=7, capture=capture)
    prompt = "The people of the world"
    dec = tiny_llm.decoder(prompt, **kw)
    dec.eos_ids = ()
    dec.run()
    short = tiny_llm.decoder(prompt, **kw)
    short.eos_ids = ()
    short.run(6)
    for s in (0, 4):
        same = dec.branch(s, dec.new_ids[s])
        same.run()
        assert same.new_ids == dec.new_ids, s
        other = next(i for i in range(3, tiny_llm.config.vocab_size) if i != dec.new_ids[s])
        branched, from_short = dec.branch(s, other), short.branch(s, other)
        branched.run()
        from_short.run()
        assert branched.new_ids == from_short.new_ids, s
        assert branched.new_ids[:s] == dec.new_ids[:s] and branched.new_ids[s] == other
