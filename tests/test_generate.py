"""The Decoder (tracer/generate.py): every capture policy makes the same tokens, exactly."""

import pytest

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
