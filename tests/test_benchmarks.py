"""The speed benchmark's --quick mode runs end to end, so that the script cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tracer import kernels

ROOT = Path(__file__).resolve().parent.parent


def test_speed_quick_writes_results(tmp_path):
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--quick", "--device", "cpu", "--threads", "1",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in ("machine", "model", "dtype", "settings", "load", "prefill", "decode", "bandwidth",
                "ratios", "goals", "transformers_attn_implementation"):
        assert key in r, key
    assert {"cpu_model", "cpu_cores", "torch", "transformers"} <= set(r["machine"])
    for which in ("ours", "transformers"):
        assert r["load"][which]["seconds"] > 0
        assert r["prefill"][which]["tokens_per_s"] > 0
    for variant in ("transformers", "matmuls_only", "bare", "ours_off", "ours_light", "ours_full"):
        v = r["decode"][variant]
        assert v["tokens_per_s"] > 0 and v["ms_per_token"] > 0
        assert len(v["tokens_per_s_all"]) == r["settings"]["repeats"]
    # Same weights, greedy: every variant of ours makes the same tokens.
    assert r["decode"]["greedy_tokens_agree_with_transformers"]["ours_variants_identical"]
    assert r["bandwidth"]["ceiling_GBps"] > 0
    assert "| decode variant |" in proc.stdout


def test_trace_cost_small_run_writes_results(tmp_path):
    out = tmp_path / "cost.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.trace_cost", "--dtype", "float16", "--tokens", "4", "--repeats", "2",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["dtype"] == "float16"
    for timing in (r, r["lockstep"]):  # per run, and the runs advancing in lockstep
        assert set(timing["median_tokens_per_s"]) == {"bare", "bare_again", "off", "light", "full"}
        for key in ("bare_again/bare", "off/bare", "light/off", "full/off"):
            assert timing["ratios"][key] > 0 and len(timing["per_round_ratios"][key]) == 2
    sizes = r["trace_bytes_on_disk"]
    assert 0 < sizes["light"] < sizes["full"]
    assert len(r["goals"]) == 2 and all(isinstance(v, bool) for v in r["goals"].values())


@pytest.mark.skipif(not kernels.library().available, reason="the benchmark compares against the CPU kernel")
def test_decode_attention_small_run_writes_results(tmp_path):
    out = tmp_path / "attention.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.decode_attention", "--model", "embedded", "--dtype", "float32",
         "--slots", "256", "--repeats", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    (size,) = r["sizes"]
    assert size["slots"] == 256 and size["positions"] == [128, 192]
    assert all(size["ms_per_step"][k] > 0 and len(size["ms_per_step_all"][k]) == 2 for k in ("torch", "kernel"))
    assert "| cache slots |" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks.decode_attention", "--slots", "300"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "multiples of 256" in bad.stderr


def test_benchmarks_readme_quotes_the_committed_results():
    """Both READMEs' figures are rendered from benchmarks/results/*.json (python -m benchmarks.report --write)."""
    from benchmarks import report

    assert report.README.read_text() == report.updated_readme(), "run: python -m benchmarks.report --write"
    assert report.TOP_README.read_text() == report.updated_top_readme(), "run: python -m benchmarks.report --write"


def test_top_readme_summary_has_a_row_and_the_figures_of_every_speed_result():
    from benchmarks import report

    text = report.summary()
    speeds = [(p, r) for p, r in report._results() if report._is_speed(r)]
    assert speeds, "no committed speed results"
    rows = [line for line in text.splitlines() if line.startswith("| ") and "(" in line.split("|")[1]]
    assert len(rows) == len(speeds)
    for path, r in speeds:
        assert f"`{path.name}`: greedy tokens equal" in text
        # The ratios that speed.py computed itself, as the table shows them.
        (row,) = [line for line in rows if f"| {r['date'][:16]} |" in line]
        assert f"({r['ratios']['decode_ours_off_over_transformers']:.2f}x)" in row
        if "decode_ours_compiled_over_transformers" in r["ratios"]:
            assert f"({r['ratios']['decode_ours_compiled_over_transformers']:.2f}x)" in row
    assert report.SUMMARY_BEGIN in report.TOP_README.read_text()


def test_llamacpp_conversion_reorders_q_and_k_for_interleaved_rope():
    """llama.cpp rotates neighbouring pairs (2i, 2i+1); HF and we rotate (i, i + d/2). With the
    projection rows re-ordered per head, attention scores come out the same."""
    import numpy as np
    import torch

    from benchmarks.llamacpp import rope_pairs_to_neighbours
    from tracer.model import apply_rope

    heads, d, dim, T = 4, 8, 16, 5
    g = torch.Generator().manual_seed(0)
    wq, wk = torch.randn(heads * d, dim, generator=g), torch.randn(heads * d, dim, generator=g)
    x = torch.randn(T, dim, generator=g)
    theta = torch.arange(T)[:, None] * 10000.0 ** (-torch.arange(d // 2) / (d // 2))  # [T, d/2]
    cos, sin = theta.cos(), theta.sin()

    def half_split(q):  # [T, H, d]: our own RoPE, pairs (i, i + d/2)
        return apply_rope(q[None], torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))[0]

    def neighbours(q):  # pairs (2i, 2i + 1)
        a, b = q[..., 0::2], q[..., 1::2]
        c, s = cos[:, None], sin[:, None]
        return torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)

    def scores(wq, wk, rope):
        q, k = (rope((x @ w.T).view(T, heads, d)) for w in (wq, wk))
        return torch.einsum("thd,shd->hts", q, k)

    ours = scores(wq, wk, half_split)
    reordered = [torch.from_numpy(rope_pairs_to_neighbours(w.numpy(), heads)) for w in (wq, wk)]
    torch.testing.assert_close(scores(*reordered, neighbours), ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scores(wq, wk, neighbours), ours, atol=1e-3)  # the re-ordering is needed
    assert np.array_equal(rope_pairs_to_neighbours(np.arange(8.0).reshape(8, 1), 2).ravel(),
                          [0, 2, 1, 3, 4, 6, 5, 7])


def test_llamacpp_tensor_names():
    import pytest

    from benchmarks.llamacpp import gguf_name

    assert gguf_name("model.layers.3.self_attn.q_proj.weight") == "blk.3.attn_q.weight"
    assert gguf_name("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    with pytest.raises(ValueError, match="no GGUF name"):
        gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq")
    with pytest.raises(ValueError, match="no GGUF name"):
        gguf_name("score.weight")


def test_llamacpp_gguf_holds_every_weight_reordered_where_rope_needs_it(make_checkpoint, tmp_path):
    """The GGUF written for --with-llamacpp: names, shapes, float16 matrices, re-ordered q/k, tied
    embeddings without output.weight, and Llama 3.1's RoPE divisors."""
    import dataclasses

    import numpy as np
    import pytest

    gguf = pytest.importorskip("gguf")
    from benchmarks.llamacpp import rope_pairs_to_neighbours, write_gguf
    from tracer.config import LlamaConfig
    from tracer.model import rope_inv_freq

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    folder, hf = make_checkpoint(tie=True, rope_scaling=rope, rope_theta=500000.0, shard_size="60KB")
    cfg = LlamaConfig.from_file(folder / "config.json")
    out = write_gguf(folder, cfg, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors and len(tensors) == 2 + 9 * cfg.num_hidden_layers + 1
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}

    def data(name):
        t = tensors[name]
        return np.asarray(t.data).reshape([int(x) for x in reversed(t.shape)])

    q = data("blk.1.attn_q.weight")
    assert q.dtype == np.float16
    expected = rope_pairs_to_neighbours(sd["model.layers.1.self_attn.q_proj.weight"], cfg.num_attention_heads)
    np.testing.assert_allclose(q, expected.astype(np.float16), rtol=0, atol=0)
    k = data("blk.0.attn_k.weight")
    np.testing.assert_allclose(k, rope_pairs_to_neighbours(sd["model.layers.0.self_attn.k_proj.weight"],
                                                           cfg.num_key_value_heads).astype(np.float16))
    np.testing.assert_allclose(data("blk.0.ffn_down.weight"),
                               sd["model.layers.0.mlp.down_proj.weight"].astype(np.float16))
    assert data("output_norm.weight").dtype == np.float32
    plain = rope_inv_freq(dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, rope_type="default")))
    divisors = data("rope_freqs.weight")
    np.testing.assert_allclose(divisors, (plain / rope_inv_freq(cfg)).numpy(), rtol=1e-6)
    assert divisors.max() == pytest.approx(8.0) and divisors.min() == pytest.approx(1.0)
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "no_vocab"
    assert int(fields["llama.vocab_size"].parts[-1][0]) == cfg.vocab_size


def test_a_cached_gguf_is_redone_when_the_checkpoint_or_the_converter_is_newer(tmp_path):
    import os

    from benchmarks import llamacpp

    out, config, converter = (tmp_path / n for n in ("m.gguf", "config.json", "llamacpp.py"))
    for i, p in enumerate((config, converter, out)):
        p.write_text("x")
        os.utime(p, (1000 + i, 1000 + i))
    assert llamacpp.is_fresh(out, config, converter)
    os.utime(converter, (2000, 2000))  # the converter changed after the file was written
    assert not llamacpp.is_fresh(out, config, converter)
    assert not llamacpp.is_fresh(tmp_path / "absent.gguf", config)


def test_quant_load_small_run_writes_results(tmp_path):
    """benchmarks/quant_load.py: both ways of loading the real model's GGUF, in fresh processes."""
    out = tmp_path / "quant.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quant_load", "--tokens", "3", "--repeats", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [run["quantized"] for run in r["runs"]] == [False, True, False, True]
    # Greedy on the same prompt: the quantized model says the same words.
    assert len({run["text"] for run in r["runs"]}) == 1, [run["text"] for run in r["runs"]]
    for key in ("load_seconds_quantized_over_float32", "rss_quantized_over_float32", "decode_quantized_over_float32"):
        assert r["ratios"][key] > 0
    assert r["ratios"]["rss_quantized_over_float32"] < 1  # the blocks stay in the mapped file


def test_a_random_q4_k_m_file_follows_llama_cpp_s_mix_and_loads_with_sane_values(tmp_path):
    """benchmarks.gguf_writer writes Q4_K_M as random K blocks: each tensor in the type
    tracer.requant.tensor_types gives it, values finite with a spread near the asked std, and our
    quantized load computes what the dequantized load computes."""
    import dataclasses

    import gguf
    import numpy as np
    import torch

    import tracer
    from benchmarks.gguf_load import standin_vocabulary
    from benchmarks.gguf_writer import write_random_mixed_gguf
    from benchmarks.speed import SHAPES
    from tracer.requant import tensor_types

    cfg = dataclasses.replace(SHAPES["llama2-7b"], hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                              num_attention_heads=4, num_key_value_heads=4, vocab_size=600)
    path = write_random_mixed_gguf(tmp_path / "mix.gguf", cfg, tokenizer=standin_vocabulary(600), std=0.02)
    reader = gguf.GGUFReader(str(path))
    types = tensor_types(cfg, "Q4_K_M")
    assert {t.name: t.tensor_type.name for t in reader.tensors} == types
    assert {"Q4_K", "Q6_K"} <= set(types.values())
    for t in reader.tensors:
        if t.tensor_type.name in ("Q4_K", "Q6_K"):
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            assert np.isfinite(values).all() and 0.01 < values.std() < 0.04, (t.name, values.std())
    q, d = (tracer.load(path, device="cpu", progress=False, quantized=k) for k in (True, False))
    ids = list(range(5, 30))
    torch.testing.assert_close(q.logits(ids), d.logits(ids), atol=1e-4, rtol=1e-4)
    assert q.load_trace.meta["quantized"]["lm_head"] == "quantized:Q6_K"
    with pytest.raises(ValueError, match="mix 'Q5_K_M' is not written here"):
        write_random_mixed_gguf(tmp_path / "other.gguf", cfg, mix="Q5_K_M")
    assert not list(tmp_path.glob("*.partial"))
