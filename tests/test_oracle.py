"""Agreement with transformers, the oracle: same ids, same logits, same tokens, same draws.

The checkpoints are random Llamas written by transformers' own ``save_pretrained``; transformers
reads them back (``from_pretrained``) and we load the same files with ``tracer.load``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tracer

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
VARIANTS = {
    "mha-single-file": dict(kv_heads=4),
    "gqa-sharded": dict(kv_heads=2, shard_size="60KB"),
    "mqa": dict(kv_heads=1),
    "tied-embeddings": dict(tie=True, shard_size="60KB"),
    "llama3-rope-v4-config": dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, style="v4"),
    "llama3-rope-v5-config": dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "dynamic-rope-v4": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, style="v4"),
    "v4-config-style": dict(style="v4", shard_size="60KB"),
    "fp16-weights": dict(dtype=torch.float16, shard_size="60KB"),
    "bf16-weights": dict(dtype=torch.bfloat16),
}
TEXTS = [
    "The people of the world",
    "  double  spaces and\ttabs",
    " leading space",
    "emoji 🦙 🚀 and ✨ sparkles",
    "digits 12345 and 3.14159",
    "newlines\n\nand more\n",
    "naïve café, Zürich Straße, 東京 日本語, Ελληνικά, Русский",
    "[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST]",
    "<s>special</s> tokens <unk> in text",
    "trailing space ",
]


def hf_model(folder: Path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def hf_generate(model, ids: list[int], **kwargs) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), **kwargs)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint):
    return transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize("text", TEXTS)
def test_token_ids_match_transformers(tiny_llm, hf_tokenizer, text):
    expected = hf_tokenizer(text)["input_ids"]
    assert tiny_llm.tokenizer.encode(text) == expected  # special-token strings parsed, as transformers
    for skip in (True, False):
        assert tiny_llm.tokenizer.decode(expected, skip) == hf_tokenizer.decode(expected, skip_special_tokens=skip)


def test_encode_without_special_parsing_matches_split_special_tokens(tiny_llm, hf_tokenizer):
    for text in TEXTS:
        expected = hf_tokenizer(text, split_special_tokens=True)["input_ids"]
        assert tiny_llm.tokenizer.encode(text, parse_special=False) == expected, text


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fp32_logits_match_transformers(make_checkpoint, variant):
    folder, _ = make_checkpoint(**VARIANTS[variant])
    ours = tracer.load(folder, device="cpu", dtype="float32", progress=False)
    theirs = hf_model(folder)
    ids = ours.tokenizer.encode("The people of the world came back to the little state " * 3)
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits[0]
    got = ours.logits(ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["gqa-sharded", "mqa", "tied-embeddings", "llama3-rope-v4-config"])
def test_greedy_continuation_matches_transformers(make_checkpoint, variant):
    folder, _ = make_checkpoint(**VARIANTS[variant])
    ours = tracer.load(folder, device="cpu", dtype="float32", progress=False)
    theirs = hf_model(folder)
    ids = ours.tokenizer.encode("It was the first day of the year, and")
    gen = ours.generate(ids, max_new_tokens=30, do_sample=False, capture="off")
    assert gen.new_ids == hf_generate(theirs, ids, max_new_tokens=30, do_sample=False)
    assert len(gen.new_ids) >= 5


def test_walkthrough_sampling_draws_the_same_tokens_as_transformers(make_checkpoint):
    """Seeded generator + same distributions = the same draws as torch.manual_seed + HF generate."""
    folder, _ = make_checkpoint(kv_heads=2, shard_size="60KB")
    ours = tracer.load(folder, device="cpu", dtype="float32", progress=False)
    theirs = hf_model(folder)
    settings = dict(do_sample=True, temperature=0.7, top_k=40, top_p=0.95, repetition_penalty=1.1)
    ids = ours.tokenizer.encode("The people of the world")
    compared = 0
    for seed in (0, 1, 2):
        gen = ours.generate(ids, max_new_tokens=48, seed=seed, capture="off", **settings)
        torch.manual_seed(seed)
        expected = hf_generate(theirs, ids, max_new_tokens=48, **settings)
        assert gen.new_ids == expected, f"seed {seed}"
        compared += len(expected)
    assert compared >= 120  # at least 40 tokens per seed on average


def test_fp16_on_cpu_matches_transformers_fp16(make_checkpoint):
    """The walkthrough's dtype, proven without a GPU: fp16 weights, fp16 compute on the CPU."""
    folder, _ = make_checkpoint(dtype=torch.float16, shard_size="60KB")
    ours = tracer.load(folder, device="cpu", dtype="float16", progress=False)
    assert ours.dtype == torch.float16
    theirs = hf_model(folder, dtype=torch.float16)
    ids = ours.tokenizer.encode("The people of the world came back to the little state")
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits[0].float()
    got = ours.logits(ids)
    # fp16 keeps ~3 significant digits: tolerance relative to the logits' scale.
    torch.testing.assert_close(got, expected, atol=2e-2 * expected.abs().max().item(), rtol=1e-2)
    gen = ours.generate(ids, max_new_tokens=20, do_sample=False, capture="off")
    assert gen.new_ids == hf_generate(theirs, ids, max_new_tokens=20, do_sample=False)


def test_hub_cache_offline_gives_the_same_logits_as_the_folder(tiny_checkpoint, tmp_path):
    """A cache in the hub layout (blobs, snapshots/<commit>, refs/main) loads with HF_HUB_OFFLINE=1."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--test-org--tiny-llama"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in tiny_checkpoint.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    ids = [1, 5, 9, 42, 7, 300, 11]
    out = tmp_path / "logits.pt"
    script = (
        "import sys, torch, tracer\n"
        "llm = tracer.load('test-org/tiny-llama', device='cpu', dtype='float32', progress=False)\n"
        f"assert llm.resolved.origin == 'hub-cache', llm.resolved\n"
        f"torch.save(llm.logits({ids}), {str(out)!r})\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HOME": str(tmp_path / "hf-home")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    local = tracer.load(tiny_checkpoint, device="cpu", dtype="float32", progress=False)
    torch.testing.assert_close(torch.load(out), local.logits(ids), atol=0, rtol=0)


def test_tokenizer_json_backend_matches_transformers(tmp_path, sp_tokenizer_dir):
    """Llama 3 style: only tokenizer.json (converted by transformers here), read with `tokenizers`."""
    hf = transformers.AutoTokenizer.from_pretrained(sp_tokenizer_dir)
    hf.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").is_file()
    from tracer.tokenizer import load_tokenizer

    tok = load_tokenizer(tmp_path)
    assert tok.backend == "tokenizers"
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        expected = ref(text)["input_ids"]
        assert tok.encode(text) == expected, text
        for skip in (True, False):
            assert tok.decode(expected, skip) == ref.decode(expected, skip_special_tokens=skip)


def test_config_styles_parse_to_the_same_config(make_checkpoint):
    v5, _ = make_checkpoint(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)
    v4, _ = make_checkpoint(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, style="v4")
    raw4, raw5 = (json.loads((f / "config.json").read_text()) for f in (v4, v5))
    assert "rope_scaling" in raw4 and "rope_parameters" in raw5 and "torch_dtype" in raw4 and "dtype" in raw5
    from tracer.config import LlamaConfig

    assert LlamaConfig.from_dict(raw4) == LlamaConfig.from_dict(raw5)


def test_embedded_model_agrees_with_transformers():
    """The shipped model: transformers loads the folder and agrees on ids, logits and greedy tokens."""
    folder = tracer.embedded_path()
    ours = tracer.load(device="cpu", dtype="float32", progress=False)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS + ["It is a truth universally acknowledged", "  two leading spaces"]:
        assert ours.tokenizer.encode(text) == hf_tok(text)["input_ids"], text
    theirs = hf_model(folder)
    ids = ours.tokenizer.encode("It is a truth universally acknowledged, that a single man in possession")
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours.logits(ids), expected, atol=1e-4, rtol=0)
    gen = ours.generate(ids, max_new_tokens=30, do_sample=False, capture="off")
    assert gen.new_ids == hf_generate(theirs, ids, max_new_tokens=30, do_sample=False)
