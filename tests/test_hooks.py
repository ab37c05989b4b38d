"""Hook points: names in one place, recording, patching, attention patterns, shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tracer import hooks
from tracer.hooks import BLOCK_POINTS, point_names, point_shapes

README = Path(__file__).resolve().parents[1] / "README.md"


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


# --- the declaration (hooks.POINTS) and what is derived from it ------------------------------------


def _fired_where(model, run):
    """(point name, class whose forward was running, shape) for every point that fires in ``run()``,
    in firing order: a module pre/post hook keeps a stack of the forwards under way."""
    under_way: list[str] = []
    fired: list[tuple[str, str, tuple[int, ...]]] = []

    def enter(module, args) -> None:
        under_way.append(type(module).__name__)

    def leave(module, args, out) -> None:  # returns None: the output stays as it is
        under_way.pop()

    def seen(x, point) -> None:
        fired.append((point.name, under_way[-1], tuple(x.shape)))

    handles = [h for m in model.modules()
               for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.no_grad(), model.hooks.attach("*", seen):
            run()
    finally:
        for h in handles:
            h.remove()
    return fired


def test_every_declared_point_fires_once_where_declared_with_its_declared_shape(tiny_llm):
    """On a prefill and a decode step after it: each point once, in declared order, inside the
    forward of the class the declaration names, with the shape its rule gives (S = cached + new)."""
    model, cfg = tiny_llm.model, tiny_llm.config
    ids = torch.tensor([tiny_llm.tokenizer.encode("The people of the world came")])
    T = ids.shape[1]
    cache = model.new_cache(T + 2)
    for tokens, cached, step in ((T, 0, ids), (1, T, ids[:, -1:])):
        fired = _fired_where(model, lambda step=step: model(step, cache))
        assert [name for name, _, _ in fired] == point_names(cfg.num_hidden_layers)
        shapes = point_shapes(cfg, tokens, cached + tokens)
        for name, where, shape in fired:
            assert where == hooks.declared(name).fires_in, name
            assert shape == shapes[name], name


def test_the_model_makes_each_declared_point_from_the_declaration():
    """gather() refuses a model whose points differ from the declaration, either way."""
    made = [hooks.HookPoint(n) for n in point_names(2)]
    owner = type("Owner", (), {})
    full, short, extra = owner(), owner(), owner()
    full.__dict__.update({f"p{i}": p for i, p in enumerate(made)})
    short.__dict__.update({f"p{i}": p for i, p in enumerate(made[:-1])})
    extra.__dict__.update({**full.__dict__, "stray": hooks.HookPoint("blocks.0.attn.qq")})
    assert list(hooks.gather([full], 2)) == point_names(2)
    with pytest.raises(ValueError, match="declared but not made: \\['logits'\\]"):
        hooks.gather([short], 2)
    with pytest.raises(ValueError, match="blocks.0.attn.qq"):
        hooks.gather([extra], 2)


def test_derived_views_follow_the_declaration():
    per_block = [p for p in hooks.POINTS if p.per_block]
    first = hooks.POINTS.index(per_block[0])
    # The per-block points are one run, so that a block's points stay together in forward order.
    assert hooks.POINTS[first : first + len(per_block)] == tuple(per_block)
    assert BLOCK_POINTS == tuple(p.name for p in per_block)
    assert list(hooks.TRANSFORMERLENS_NAMES) == [p.template for p in hooks.POINTS]
    assert all(tl.startswith("blocks.{i}.") for p in per_block for tl in [hooks.TRANSFORMERLENS_NAMES[p.template]])
    assert {d for p in hooks.POINTS for d in p.shape} <= set(hooks.DIMS)
    for name in point_names(3):
        point = hooks.declared(name)
        assert name in ([point.at(i) for i in range(3)] if point.per_block else [point.at()])
    assert hooks.declared("blocks.1.attn.qq") is None and hooks.declared("blocks.x.ln1") is None
    assert hooks.ATTN_PATTERN.at(3) == "blocks.3.attn.pattern" and hooks.ATTN_PATTERN.glob == "blocks.*.attn.pattern"
    with pytest.raises(ValueError):
        hooks.EMBED.at(0)
    with pytest.raises(ValueError):
        hooks.LN1.at()


def test_readme_table_is_the_declaration():
    """The README's hook point table is hooks.markdown_table(): one row per declared point."""
    table = hooks.markdown_table()
    assert table in README.read_text(encoding="utf-8"), "README.md's table: paste hooks.markdown_table()"
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == [p.template for p in hooks.POINTS]
