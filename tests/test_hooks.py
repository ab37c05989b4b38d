"""Hook points: names in one place, recording, patching, attention patterns, shapes."""

from __future__ import annotations

import torch

from tracer.hooks import BLOCK_POINTS, point_names, point_shapes


def test_every_point_is_listed_once_in_forward_order(tiny_llm):
    names = list(tiny_llm.model.hooks)
    assert names == point_names(tiny_llm.config.num_hidden_layers)
    assert names[0] == "embed" and names[-1] == "logits"
    assert names[1 : 1 + len(BLOCK_POINTS)] == [f"blocks.0.{p}" for p in BLOCK_POINTS]


def test_recorded_activations_equal_a_forward_without_hooks(tiny_llm):
    model = tiny_llm.model
    ids = torch.tensor([tiny_llm.tokenizer.encode("The people of the world came back")])
    # Every point but the pattern: reading a point must not change the computation at all.
    # (Asking for the pattern switches that layer to the explicit path: see test_model.)
    every = [n for n in model.hooks if not n.endswith("attn.pattern")]
    with torch.no_grad():
        plain = model(ids)
        with model.hooks.record(every) as rec:
            hooked = model(ids)
    assert torch.equal(hooked, plain) and torch.equal(rec["logits"], plain)
    assert rec.names() == every
    # The residual after the last block, through final norm and lm_head, is the logits.
    last = f"blocks.{tiny_llm.config.num_hidden_layers - 1}.resid_post"
    torch.testing.assert_close(model.unembed(rec[last]), plain, atol=1e-5, rtol=0)
    shapes = point_shapes(tiny_llm.config, ids.shape[1], ids.shape[1])
    for name in rec.names():
        assert tuple(rec[name].shape) == shapes[name], name


def test_attention_patterns_are_causal_rows_that_sum_to_one(tiny_llm):
    model = tiny_llm.model
    ids = torch.tensor([tiny_llm.tokenizer.encode("It was the first day of the year")])
    with torch.no_grad(), model.hooks.record("blocks.*.attn.pattern") as rec:
        model(ids)
    T = ids.shape[1]
    for name in rec.names():
        p = rec[name][0]  # [H, T, T]
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5, rtol=0)
        assert torch.all(p.triu(diagonal=1) == 0)
        assert p.shape[-2:] == (T, T)


def test_a_callback_that_zeroes_one_head_changes_the_logits(tiny_llm):
    model = tiny_llm.model
    ids = torch.tensor([tiny_llm.tokenizer.encode("The people of the world")])

    def ablate_head_1(z, point):
        z = z.clone()
        z[:, :, 1] = 0  # [B, T, H, hd]
        return z

    with torch.no_grad():
        before = model(ids)
        with model.hooks.attach("blocks.0.attn.z", ablate_head_1):
            ablated = model(ids)
        after = model(ids)
    assert not torch.allclose(ablated, before, atol=1e-4)
    assert torch.equal(after, before)  # the hook is gone after the with-block
    assert not model.hooks.any_active


def test_unknown_pattern_names_the_scheme(tiny_llm):
    import pytest

    with pytest.raises(KeyError, match="blocks.0.attn.pattern"):
        tiny_llm.model.hooks.select("blocks.*.attention")


def test_every_point_can_be_listed_with_its_shape(tiny_llm):
    table = tiny_llm.hook_points(tokens=5, cached=3)
    assert list(table) == list(tiny_llm.model.hooks)
    cfg = tiny_llm.config
    assert table["blocks.0.attn.pattern"] == (1, cfg.num_attention_heads, 5, 8)
    assert table["blocks.1.attn.k"] == (1, 5, cfg.num_key_value_heads, cfg.head_dim)
