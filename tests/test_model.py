"""tracer.model: cache vs no cache, RoPE variants, meta construction, explicit vs SDPA attention."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tracer.config import LlamaConfig, RopeConfig
from tracer.model import LlamaModel, causal_mask, init_weights, rope_inv_freq


def small_model(**overrides) -> LlamaModel:
    cfg = LlamaConfig(**{
        "vocab_size": 97, "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 64, **overrides,
    })
    model = LlamaModel(cfg).eval()
    init_weights(model, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    return model


@pytest.mark.parametrize("kv", [6, 2, 1])
def test_cached_decode_equals_full_recompute(kv):
    model = small_model(num_key_value_heads=kv)
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(24)
        chunks = [model(ids[:, :8], cache), model(ids[:, 8:13], cache)]
        chunks += [model(ids[:, t : t + 1], cache) for t in range(13, 20)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 20


def test_last_only_returns_the_last_position():
    model = small_model()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, last_only=True), model(ids)[:, -1:], atol=1e-6, rtol=0)


def test_meta_construction_allocates_nothing():
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32)
    model = LlamaModel(cfg, device="meta", dtype=torch.float16)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters


def test_allocate_gives_every_meta_parameter_storage_on_the_device():
    model = LlamaModel(small_model().config, device="meta", dtype=torch.float16)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert model.allocate("cpu") is model
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert all(p.device.type == "cpu" and p.dtype == torch.float16 and isinstance(p, torch.nn.Parameter)
               for p in model.parameters())


def test_allocate_does_not_import_the_symbolic_shape_machinery():
    # nn.Module.to_empty's first call imports torch.fx's symbolic shapes (and sympy): half a
    # second of every fresh process's load. A subprocess, because other tests may import it.
    code = (
        "import sys; from tracer.config import LlamaConfig; from tracer.model import LlamaModel\n"
        "cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,"
        " num_attention_heads=4, num_key_value_heads=2)\n"
        "LlamaModel(cfg, device='meta').allocate('cpu')\n"
        "print('sympy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_explicit_attention_path_agrees_with_sdpa():
    model = small_model()
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        fast = model(ids)
        with model.hooks.record("blocks.*.attn.pattern") as rec:
            explicit = model(ids)
    torch.testing.assert_close(explicit, fast, atol=1e-5, rtol=0)
    assert len(rec.names()) == 3


def test_causal_mask_is_rectangular_for_chunks_with_a_past():
    m = causal_mask(3, 4, "cpu")
    assert m.shape == (3, 7)
    assert m[0].tolist() == [True] * 5 + [False] * 2
    assert causal_mask(1, 10, "cpu") is None


def test_llama3_rope_keeps_high_frequencies_and_slows_low_ones():
    base = dict(vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    plain = rope_inv_freq(LlamaConfig(**base, rope=RopeConfig(theta=500000.0)))
    scaled = rope_inv_freq(LlamaConfig(**base, rope=RopeConfig("llama3", 500000.0, 8.0, 1.0, 4.0, 32)))
    assert scaled[0] == plain[0]  # shortest wavelength untouched
    assert torch.isclose(scaled[-1], plain[-1] / 8)  # longest slowed by `factor`


def test_kv_cache_is_sized_for_the_request_not_the_config_maximum():
    model = small_model(max_position_embeddings=131072)
    cache = model.new_cache(40)
    assert cache.k.shape[3] == 40
    assert cache.bytes_allocated == 2 * 3 * 1 * 2 * 40 * 8 * 4


@torch.inference_mode()
def test_a_decode_token_with_a_pattern_hook_sees_the_written_positions_only():
    """One token after a prompt, in a cache larger than what is written: the explicit path's
    pattern spans the positions so far (not the unwritten slots), sums to 1, and its output is
    SDPA's."""
    model = small_model()
    ids = [3, 14, 15, 92, 65]
    a, b = model.new_cache(len(ids) + 4), model.new_cache(len(ids) + 4)
    model(torch.tensor([ids]), a)
    model(torch.tensor([ids]), b)
    want = model(torch.tensor([[5]]), a)
    with model.hooks.record("blocks.0.attn.pattern") as rec:
        got = model(torch.tensor([[5]]), b)
    pattern = rec["blocks.0.attn.pattern"]  # [1, H, 1, S]
    assert pattern.shape == (1, 6, 1, len(ids) + 1)
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_tied_embeddings_are_one_parameter_after_allocate_and_load(tmp_path):
    """Tied: lm_head's weight is the embedding's Parameter, and stays so through allocate()
    (counted once; what the loader fills is what lm_head reads)."""
    cfg = dataclasses.replace(small_model().config, tie_word_embeddings=True)
    model = LlamaModel(cfg, device="meta").allocate("cpu")
    assert model.lm_head.weight is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters
    init_weights(model, torch.Generator().manual_seed(0))
    h = torch.randn(1, 1, cfg.hidden_size)
    torch.testing.assert_close(model.lm_head(h), h @ model.embed.weight.T)


def test_the_model_knows_nothing_of_the_fast_path():
    """tracer/model.py is the network only: the kernels, compiling and capture live elsewhere."""
    source = (Path(__file__).resolve().parent.parent / "tracer" / "model.py").read_text().lower()
    for word in ("kernel", "compile", "capture", "matvec"):
        assert word not in source, word
